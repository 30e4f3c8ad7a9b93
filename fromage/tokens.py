"""Token-level conventions every layer shares: the placeholder ids in `input_ids`, the special
tokens read off a tokenizer, tokenising captions, and left-padding.

A leaf: imports nothing from the package, so data, model, generation and scoring agree on
these without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IMAGE_TOKEN_ID = -200
"""Placeholder id of a visual-token slot in `input_ids` (each image fills k consecutive slots)."""
IGNORE_INDEX = -100
"""Label of a position that predicts nothing (PyTorch's cross-entropy default)."""


@dataclass
class SpecialTokens:
    bos: int
    eos: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer: object) -> SpecialTokens:
        bos = getattr(tokenizer, "bos_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        if eos is None:
            raise ValueError("the tokenizer has no EOS token; captions could never end")
        if bos is None:
            bos = eos  # GPT-2 style: one token serves as both
        return cls(int(bos), int(eos), int(pad if pad is not None else eos))


def tokenize_captions(tokenizer: object, captions: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Caption text → ids without special tokens, truncated to `max_tokens`."""
    if not captions:
        return []  # fast tokenizers fail on an empty batch
    encoded = tokenizer(list(captions), add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return [list(ids[:max_tokens]) for ids in encoded]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) left-padded ids and their attention mask: every row ends at the last column, so
    position -1 is each row's last token (where `[RET]` goes, or the next token is predicted)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask
