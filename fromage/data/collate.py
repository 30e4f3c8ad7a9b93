"""Token layouts for the two training passes (DESIGN §3).

Captioning: `[img × k][BOS] caption [EOS]`, loss on caption tokens and EOS only; with the
interleaving trick two pairs share one row: `[img1][BOS]cap1[EOS][img2][BOS]cap2[EOS]`.
Retrieval: `[BOS] caption`, left-padded so every row ends where `[RET]` goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..tokens import IGNORE_INDEX, IMAGE_TOKEN_ID, SpecialTokens, left_pad


@dataclass
class CaptionBatch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE_INDEX where nothing is predicted
    image_order: list[int]  # which example's features fill the image slots, in order


def caption_batch(
    captions: Sequence[list[int]],
    k: int,
    special: SpecialTokens,
    interleave: bool = False,
    context: Sequence[int] | None = None,
) -> CaptionBatch:
    """Rows of `[img][BOS] caption [EOS]`; with `interleave`, consecutive pairs share a row.
    `context[i]` leading tokens of caption i are read but not predicted (a question before its
    answer); none by default."""
    if context is not None and len(context) != len(captions):
        raise ValueError(f"{len(context)} context lengths for {len(captions)} captions")
    groups = [[i, i + 1] for i in range(0, len(captions) - 1, 2)] if interleave else []
    if interleave and len(captions) % 2:
        groups.append([len(captions) - 1])
    if not interleave:
        groups = [[i] for i in range(len(captions))]
    rows: list[list[int]] = []
    row_labels: list[list[int]] = []
    order: list[int] = []
    for group in groups:
        ids: list[int] = []
        labels: list[int] = []
        for i in group:
            text = [special.bos, *captions[i], special.eos]
            ids += [IMAGE_TOKEN_ID] * k + text
            # BOS is context, not a target; every caption token (past the context) and EOS is
            # predicted.
            skip = 1 + (context[i] if context is not None else 0)
            labels += [IGNORE_INDEX] * (k + skip) + text[skip:]
            order.append(i)
        rows.append(ids)
        row_labels.append(labels)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), special.pad, dtype=torch.long)
    labels_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, labels) in enumerate(zip(rows, row_labels, strict=False)):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels_t[r, : len(labels)] = torch.tensor(labels)
        mask[r, : len(ids)] = 1
    return CaptionBatch(input_ids, mask, labels_t, order)


def retrieval_prefix_batch(
    texts: Sequence[list[int]], special: SpecialTokens
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `[BOS] text` rows (B, T) and their attention mask."""
    return left_pad([[special.bos, *t] for t in texts], special.pad)
