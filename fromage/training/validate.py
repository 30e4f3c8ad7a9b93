"""The metrics training reports: retrieval recall in both directions,
caption token accuracy and exact greedy captions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.builtin import is_heldout
from ..data.collate import caption_batch
from ..data.dataset import Split
from ..embed import StateCache, embed_images, embed_texts
from ..generate import greedy_captions
from ..metrics import group_recall_at_k
from ..model import FromageModel
from ..tokens import SpecialTokens


@torch.no_grad()
def caption_token_accuracy(
    model: FromageModel,
    split: Split,
    texts: Sequence[list[int]],
    special: SpecialTokens,
    batch_size: int = 128,
) -> float:
    device = model.ret_embedding.device
    right = total = 0
    for start in range(0, len(split), batch_size):
        batch = caption_batch(texts[start : start + batch_size], model.config.num_visual_tokens, special)
        feats = split.features[0, start : start + batch_size][batch.image_order].to(device)
        logits, targets = model.caption_forward(
            batch.input_ids.to(device), batch.attention_mask.to(device), feats, batch.labels.to(device)
        )
        right += int((logits.argmax(-1) == targets).sum())
        total += int(targets.numel())
    return right / max(total, 1)


def validate(
    model: FromageModel,
    name: str,
    split: Split,
    texts: Sequence[list[int]],
    special: SpecialTokens,
    tokenizer: object | None = None,
    heldout_fraction: float = 0.1,
    captions: bool = False,
    max_captions: int = 128,
    max_token_accuracy: int = 256,
    states: StateCache | None = None,
    request_texts: Sequence[list[int]] | None = None,
) -> dict[str, float]:
    """Metrics on one validation split. The gallery is the whole split; for emoji the queries
    are reported separately for trained and held-out concepts. `request_texts` (one per
    example, e.g. "show me a red apple") adds text→image recall for requests."""
    was_training = model.training
    model.eval()
    try:
        # Galleries of two styles share their captions, and trained captions were already
        # run during training: `states` holds every [RET] state computed so far.
        text_emb = embed_texts(model, texts, special, states=states)
        image_emb = embed_images(model, split.features[0])
        groups = [e.group for e in split.examples]
        scores = text_emb @ image_emb.T  # (N, N) text → image
        subsets: dict[str, list[int]] = {"": list(range(len(split)))}
        if name.startswith("emoji"):
            held = [is_heldout(e.caption, heldout_fraction) for e in split.examples]
            subsets = {
                "trained/": [i for i, h in enumerate(held) if not h],
                "heldout/": [i for i, h in enumerate(held) if h],
            }
        metrics: dict[str, float] = {}
        for prefix, rows in subsets.items():
            if not rows:
                continue
            q_groups = [groups[i] for i in rows]
            for k, v in group_recall_at_k(scores[rows], q_groups, groups).items():
                metrics[f"{prefix}t2i_{k}"] = v
            for k, v in group_recall_at_k(scores.T[rows], q_groups, groups).items():
                metrics[f"{prefix}i2t_{k}"] = v
        if request_texts is not None:
            request_scores = embed_texts(model, request_texts, special, states=states) @ image_emb.T
            for prefix, rows in subsets.items():
                if rows:
                    recall = group_recall_at_k(request_scores[rows], [groups[i] for i in rows], groups)
                    metrics.update({f"{prefix}request_t2i_{k}": v for k, v in recall.items()})
        sample = _spread(list(range(len(split))), max_token_accuracy)
        metrics["caption_token_acc"] = caption_token_accuracy(
            model,
            Split([split.examples[i] for i in sample], split.features[:, sample]),
            [texts[i] for i in sample],
            special,
        )
        if captions and tokenizer is not None:
            for prefix, rows in subsets.items():
                if not rows:
                    continue
                # Greedy decoding is the slow part: score a fixed, evenly spread sample.
                rows = _spread(rows, max_captions)
                generated = greedy_captions(model, split.features[0][rows], special)
                decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)  # type: ignore[attr-defined]
                exact = [
                    d.strip().lower() == split.examples[i].caption.lower()
                    for d, i in zip(decoded, rows, strict=False)
                ]
                metrics[f"{prefix}caption_exact"] = sum(exact) / len(exact)
        return metrics
    finally:
        model.train(was_training)


def _spread(rows: list[int], limit: int) -> list[int]:
    """At most `limit` items, evenly spread over `rows` (deterministic)."""
    if len(rows) <= limit:
        return rows
    stride = len(rows) / limit
    return [rows[int(i * stride)] for i in range(limit)]


def validate_all(
    model: FromageModel,
    val_splits: dict[str, Split],
    val_captions: dict[str, list[list[int]]],
    special: SpecialTokens,
    tokenizer: object,
    heldout_fraction: float,
    captions: bool,
    states: StateCache,
    val_requests: dict[str, list[list[int]]] | None = None,
) -> dict[str, float]:
    """`validate` on every non-empty validation split; keys `val/<split>/<metric>`."""
    out: dict[str, float] = {}
    for name, split in val_splits.items():
        if not len(split):
            continue
        metrics = validate(
            model,
            name,
            split,
            val_captions[name],
            special,
            tokenizer,
            heldout_fraction,
            captions=captions,
            states=states,
            request_texts=(val_requests or {}).get(name),
        )
        out.update({f"val/{name}/{k}": v for k, v in metrics.items()})
    return out
