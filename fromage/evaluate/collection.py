"""Retrieval and captioning on any captioned collection (the published TSV `caption<TAB>image`
or JSONL `{"image": …, "caption": …}`). Rows that share an image are its references (COCO
style: several captions per image).

- text→image: each caption → rank the distinct images; its own image is correct.
- image→text: each image → rank the distinct captions; any of its own captions is correct.
- captioning: greedy captions (`[RET]` never allowed) scored with BLEU-1..4 and CIDEr-D
  against all of the image's captions (textmetrics.py; numbers match coco-caption).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from ..data.readers import BadInputLog, read_collection
from ..generate import greedy_captions
from ..metrics import masked_recall_at_k
from .engine import Evaluator, cosine_scores
from .ranking import NO_TEXT_TOWER
from .report import Row, TaskResult
from .textmetrics import bleu, cider, tokenize


def evaluate_collection(
    ev: Evaluator, path: str | Path, image_dir: str | Path | None = None, captions: bool = True
) -> tuple[TaskResult, list[dict[str, object]]]:
    """→ the table and, per image, its generated caption and references."""
    bad = BadInputLog()
    rows = read_collection(Path(path), image_dir, bad)
    refs: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        refs[r.image].append(r.caption)
    encoded = ev.encode_images(list(refs), desc="collection images")
    images = encoded.paths
    if not images:
        raise ValueError(f"{path}: no readable image")
    texts = sorted({r.caption for r in rows if r.image in set(images)})
    text_emb = ev.query_embeddings([[t] for t in texts], desc="captions")
    image_emb = ev.image_embeddings(encoded.features)
    scores = cosine_scores(text_emb, image_emb)  # (T, I)
    # A caption written for several images counts each of them as correct.
    text_group = {t: f"t{i}" for i, t in enumerate(texts)}
    image_groups = [[text_group[c] for c in refs[p]] for p in images]
    t2i = _multi_group(scores, [text_group[t] for t in texts], image_groups)
    i2t = _multi_group(scores.T, image_groups, [[text_group[t]] for t in texts])
    table = [
        Row("fromage", "text → image", t2i),
        Row("fromage", "image → text", i2t),
        Row("baseline", "text → image", dict.fromkeys(t2i), NO_TEXT_TOWER),
    ]
    generated: list[dict[str, object]] = []
    if captions:
        ids = greedy_captions(ev.model, encoded.features, ev.special)
        hyps = [t.strip() for t in ev.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        tok_refs = [[" ".join(tokenize(c)) for c in refs[p]] for p in images]
        tok_hyps = [" ".join(tokenize(h)) for h in hyps]
        metrics: dict[str, float | None] = {**bleu(tok_refs, tok_hyps), "CIDEr": cider(tok_refs, tok_hyps)}
        table.append(Row("fromage", "captioning (greedy)", metrics))
        generated = [
            {"image": p, "caption": h, "references": refs[p]} for p, h in zip(images, hyps, strict=True)
        ]
    counts = {
        "rows": len(rows),
        "images": len(images),
        "distinct_captions": len(texts),
        "skipped_unreadable_images": len(encoded.unreadable),
        **{f"skipped_{k.replace(' ', '_')}": v for k, v in bad.counts.items()},
    }
    return TaskResult(f"captioned collection: {Path(path).name}", table, counts), generated


def _multi_group(
    scores: torch.Tensor, query_groups: list[str] | list[list[str]], gallery_groups: list[list[str]]
) -> dict[str, float | None]:
    """Recall where a query and a gallery item match when their group sets intersect."""
    correct = torch.zeros_like(scores, dtype=torch.bool)
    for q, groups in enumerate(query_groups):
        mine = {groups} if isinstance(groups, str) else set(groups)
        for j, theirs in enumerate(gallery_groups):
            correct[q, j] = bool(mine & set(theirs))
    return dict(masked_recall_at_k(scores, correct, (1, 5, 10)))
