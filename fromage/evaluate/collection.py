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

from ..config import MAX_BAD_FRACTION
from ..data.readers import BadInputLog, TooManyBadInputs, read_collection
from ..generate import greedy_captions
from ..metrics import masked_recall_at_k
from .engine import Evaluator, cosine_scores
from .ranking import NO_TEXT_TOWER
from .report import Row, TaskResult
from .textmetrics import bleu, cider, tokenize

MAX_CAPTION_CHARS = 1000
"""Captions are cut here (COCO's longest is ~250 characters): a 100 KB caption would otherwise
be one prompt of 25k tokens and a CIDEr reference of as many n-grams."""


def evaluate_collection(
    ev: Evaluator,
    path: str | Path,
    image_dir: str | Path | None = None,
    captions: bool = True,
    max_bad_fraction: float = MAX_BAD_FRACTION,
) -> tuple[TaskResult, list[dict[str, object]]]:
    """→ the table and, per image, its generated caption and references. Stops (naming the
    first problems) when more than `max_bad_fraction` of the rows are malformed or their images
    unreadable: a score over what is left would say nothing about the collection."""
    bad = BadInputLog()
    rows = read_collection(Path(path), image_dir, bad)
    refs: dict[str, list[str]] = defaultdict(list)
    truncated = 0
    for r in rows:
        truncated += len(r.caption) > MAX_CAPTION_CHARS
        refs[r.image].append(r.caption[:MAX_CAPTION_CHARS])
    encoded = ev.encode_images(list(refs), desc="collection images")
    images = encoded.paths
    malformed = bad.total
    for missing in encoded.unreadable:
        bad.add("unreadable image", f"{missing}: unreadable image ({len(refs[missing])} rows)")
    seen = len(rows) + malformed
    lost = malformed + sum(len(refs[m]) for m in encoded.unreadable)
    if seen and lost / seen > max_bad_fraction:
        first = "\n  ".join(bad.messages[:10])
        raise TooManyBadInputs(
            f"{path}: {lost} of {seen} rows are malformed or their image unreadable "
            f"({lost / seen:.1%} > limit {max_bad_fraction:.1%}); first problems:\n  {first}"
        )
    if not images:
        raise ValueError(f"{path}: no readable image")
    texts = sorted({c for p in images for c in refs[p]})
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
        "captions_truncated": truncated,
        **{f"skipped_{k.replace(' ', '_')}": v for k, v in bad.counts.items()},
    }
    return TaskResult(f"captioned collection: {Path(path).name}", table, counts), generated
