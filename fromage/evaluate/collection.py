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
    kept = set(images)
    texts = sorted({r.caption for r in rows if r.image in kept})
    text_emb = ev.query_embeddings([[t] for t in texts], desc="captions")
    image_emb = ev.image_embeddings(encoded.features)
    scores = cosine_scores(text_emb, image_emb)  # (T, I)
    # Every (caption, image) row is a correct pair, in both directions: a caption written for
    # several images accepts each of them, an image with several captions accepts each.
    correct = torch.zeros_like(scores, dtype=torch.bool)
    text_row = {t: i for i, t in enumerate(texts)}
    for j, p in enumerate(images):
        for c in refs[p]:
            correct[text_row[c], j] = True
    t2i: dict[str, float | None] = dict(masked_recall_at_k(scores, correct))
    i2t: dict[str, float | None] = dict(masked_recall_at_k(scores.T, correct.T))
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
