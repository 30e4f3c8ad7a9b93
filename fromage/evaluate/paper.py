"""The paper's benchmarks on the official files (DESIGN §5).

- VIST contextual image retrieval: `cap1 img1 … cap4 img4 cap5 [RET]` → rank every candidate
  image (all images of the file's stories; the story's 4 context images excluded), R@1/5/10,
  in the paper's three context settings side by side, next to the frozen encoder's
  mean-of-context baseline.
- VisDial text→image: a dialogue's caption and all its rounds as `Q: q? A: a.` + `[RET]` →
  rank every dialogue image. The published script ranked the other way (image → dialogue);
  this is the direction the paper reports.
- VisDial answer selection: image + caption + earlier rounds + `Q: q? A:` → the 100 candidate
  answers ranked by log-likelihood (shift done right); R@1/5/10, MRR, mean rank, and NDCG on
  the dense annotations with their 1-based `round_id` mapped to round `round_id - 1`, as the
  official evaluation does (the published FROMAGe script forgot the `- 1`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..metrics import mean_reciprocal_rank, recall_at_k, target_ranks, visdial_ndcg
from .engine import Evaluator, Prompt, cosine_scores
from .formats import VisDialData, VistData
from .ranking import NO_TEXT_TOWER, exclude, mean_context_baseline, retrieval_metrics
from .report import Row, TaskResult

VIST_SETTINGS = ("1 caption", "5 captions", "5 captions + 4 images")
_EMPTY = ("R@1", "R@5", "R@10", "MRR")


def _encode_or_count(ev: Evaluator, paths: Sequence[Path], desc: str) -> tuple[dict[str, int], torch.Tensor]:
    encoded = ev.encode_images([str(p) for p in paths], desc=desc)
    return {p: i for i, p in enumerate(encoded.paths)}, encoded.features


def vist_prompts(captions: Sequence[str], images: Sequence[torch.Tensor]) -> dict[str, Prompt]:
    """The three settings of one story (5 captions, 5 image features; the 5th image is the target)."""
    full: list = []
    for cap, img in zip(captions[:4], images[:4], strict=True):
        full += [cap, img]
    return {
        VIST_SETTINGS[0]: [captions[4]],
        VIST_SETTINGS[1]: [" ".join(captions)],
        VIST_SETTINGS[2]: [*full, captions[4]],
    }


def evaluate_vist(ev: Evaluator, data: VistData) -> TaskResult:
    ids = sorted(data.candidates)
    row_of_path, feats = _encode_or_count(ev, [data.candidates[i] for i in ids], "VIST images")
    usable = [i for i in ids if str(data.candidates[i]) in row_of_path]
    gallery = {image_id: g for g, image_id in enumerate(usable)}
    gallery_feats = feats[torch.tensor([row_of_path[str(data.candidates[i])] for i in usable])]
    stories = [s for s in data.stories if all(i in gallery for i in s.image_ids)]
    if not stories:
        raise ValueError("no VIST story has all five images readable: check the image directory")
    prompts: dict[str, list[Prompt]] = {k: [] for k in VIST_SETTINGS}
    for story in stories:
        images = [gallery_feats[gallery[i]] for i in story.image_ids]
        for k, prompt in vist_prompts(story.captions, images).items():
            prompts[k].append(prompt)
    targets = torch.tensor([gallery[s.image_ids[4]] for s in stories])
    context = [[gallery[i] for i in s.image_ids[:4]] for s in stories]
    images = ev.image_embeddings(gallery_feats)
    rows = []
    for k in VIST_SETTINGS:
        scores = exclude(cosine_scores(ev.query_embeddings(prompts[k], desc=f"VIST: {k}"), images), context)
        rows.append(Row("fromage", k, retrieval_metrics(scores, targets)))
    for k in VIST_SETTINGS[:2]:
        rows.append(Row("baseline", k, dict.fromkeys(_EMPTY), NO_TEXT_TOWER))
    base = exclude(mean_context_baseline([gallery_feats[c] for c in context], gallery_feats), context)
    rows.append(
        Row("baseline", VIST_SETTINGS[2], retrieval_metrics(base, targets), "mean of the 4 context images")
    )
    counts = {
        "stories": len(stories),
        "candidates": len(usable),
        **{f"skipped_{k}": v for k, v in data.skipped.items()},
        "skipped_stories_unreadable_image": len(data.stories) - len(stories),
        "skipped_candidates_unreadable": len(ids) - len(usable),
    }
    return TaskResult("VIST contextual image retrieval", rows, counts)


def dialogue_text(caption: str, rounds: Sequence[tuple[str, str]]) -> str:
    """`caption. Q: q? A: a. …` — the VisDial query form of the paper."""
    parts = [caption.strip().rstrip(".") + "."] if caption.strip() else []
    for question, answer in rounds:
        q = question.strip()
        parts.append(f"Q: {q if q.endswith('?') else q + '?'} A: {answer.strip()}.")
    return " ".join(parts)


def evaluate_visdial_retrieval(ev: Evaluator, data: VisDialData) -> TaskResult:
    row_of_path, feats = _encode_or_count(ev, [d.image for d in data.dialogs], "VisDial images")
    dialogs = [d for d in data.dialogs if str(d.image) in row_of_path]
    if not dialogs:
        raise ValueError("no VisDial dialogue has a readable image: check the image directory")
    gallery_feats = feats[torch.tensor([row_of_path[str(d.image)] for d in dialogs])]
    texts = [[dialogue_text(d.caption, [(r.question, r.answer) for r in d.rounds])] for d in dialogs]
    scores = cosine_scores(
        ev.query_embeddings(texts, desc="VisDial dialogues"), ev.image_embeddings(gallery_feats)
    )
    targets = torch.arange(len(dialogs))
    rows = [
        Row("fromage", "caption + all rounds → image", retrieval_metrics(scores, targets)),
        Row("baseline", "caption + all rounds → image", dict.fromkeys(_EMPTY), NO_TEXT_TOWER),
    ]
    counts = {
        "dialogs": len(dialogs),
        **{f"skipped_{k}": v for k, v in data.skipped.items()},
        "skipped_dialogs_unreadable_image": len(data.dialogs) - len(dialogs),
    }
    return TaskResult("VisDial text→image retrieval", rows, counts)


def evaluate_visdial_answers(
    ev: Evaluator, data: VisDialData, dense: dict[tuple[int, int], tuple[float, ...]] | None = None
) -> TaskResult:
    row_of_path, feats = _encode_or_count(ev, [d.image for d in data.dialogs], "VisDial images")
    dialogs = [d for d in data.dialogs if str(d.image) in row_of_path]
    all_scores, targets, dense_rows, dense_rel = [], [], [], []
    for d in tqdm(dialogs, desc="VisDial answers", unit="dialog", leave=False, disable=not ev.progress):
        image = feats[row_of_path[str(d.image)]]
        for r, round_ in enumerate(d.rounds):
            history = dialogue_text(d.caption, [(x.question, x.answer) for x in d.rounds[:r]])
            q = round_.question.strip()
            text = f"{history} Q: {q if q.endswith('?') else q + '?'} A:".strip()
            scores = ev.answer_scores([image, text], [f" {o.strip()}" for o in round_.options])
            all_scores.append(scores)
            targets.append(round_.gt_index)
            if dense is not None and (d.image_id, r) in dense:
                dense_rows.append(len(all_scores) - 1)
                dense_rel.append(torch.tensor(dense[(d.image_id, r)]))
    if not all_scores:
        raise ValueError("no VisDial round to score: check the files and the image directory")
    scores_t = torch.stack(all_scores)
    target_t = torch.tensor(targets)
    metrics: dict[str, float | None] = {
        **recall_at_k(scores_t, target_t, (1, 5, 10)),
        "MRR": mean_reciprocal_rank(scores_t, target_t),
        "mean rank": float((target_ranks(scores_t, target_t) + 1).float().mean()),
        "NDCG": visdial_ndcg(scores_t[dense_rows], torch.stack(dense_rel)) if dense_rows else None,
    }
    counts = {
        "dialogs": len(dialogs),
        "rounds": len(targets),
        "rounds_with_dense_relevance": len(dense_rows),
        **{f"skipped_{k}": v for k, v in data.skipped.items()},
        "skipped_dialogs_unreadable_image": len(data.dialogs) - len(dialogs),
    }
    notes = [] if dense is not None else ["NDCG needs the dense annotation file (--dense)."]
    rows = [Row("fromage", "image + caption + history → 100 answers", metrics)]
    return TaskResult("VisDial answer selection", rows, counts, notes=notes)
