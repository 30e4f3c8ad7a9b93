"""`fromage eval offline`: the paper's protocols on data that ships through package registries.

(a) emoji cross-style retrieval: an emoji's name → its Twitter rendering among every Twitter
    emoji; concepts the model trained on and held-out concepts reported apart.
(b) dialogue retrieval (the VisDial text→image protocol): 2–4 easy-VQA rounds about one test
    image, `Q: q A: a.` each, + `[RET]` → rank the 1,000 test images; any image of the same
    colour and shape is correct, and the rounds are chosen so their answers determine both
    (data/dialogues.py), so the ceiling is 1.0.
(c) answer selection (the VisDial answer protocol): a test image + earlier rounds + a question
    → rank the 13 easy-VQA answers by log-likelihood; R@1, MRR. The same prompts without the
    image are the baseline: what the frozen LM guesses from the text alone.
(d) story retrieval (the VIST protocol): five emoji of one family ("… heart"); the first four
    are named in full, the fifth only by what sets it apart ("blue"), so context is what
    resolves it. Rank every Google emoji (the four context images excluded) with 1 caption,
    5 captions, and 5 captions + 4 images; the frozen encoder's baseline ranks by the mean of
    the four context images. Stories come from the emoji families training never builds
    stories from (data/builtin.py `is_story_training_family`).
(e) requests: name, a training-form request, and requests in sentence forms no training
    template uses (data/requests.py `HELD_OUT_TEMPLATES`), alone and after an unrelated
    earlier exchange in the chat format → rank every Google emoji.
(f) greedy captions, exact match: Google emoji of trained and held-out concepts, Twitter
    renderings of trained concepts, easy-VQA test images.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import training_record
from ..data.builtin import (
    EASYVQA_ANSWERS,
    EASYVQA_COLORS,
    EASYVQA_SHAPES,
    EMOJI_VERSION,
    easyvqa_images,
    emoji_examples,
    is_heldout,
    is_story_training_family,
)
from ..data.dialogues import ask, determining_dialogue, format_rounds
from ..data.examples import Example
from ..data.requests import held_out_request, request_forms
from ..metrics import mean_reciprocal_rank, recall_at_k
from .engine import Evaluator, cosine_scores
from .ranking import NO_TEXT_TOWER, exclude, group_metrics, mean_context_baseline, retrieval_metrics
from .report import Row, TaskResult


@dataclass
class OfflineSettings:
    dialogue_queries: int = 500
    answer_images: int = 300
    answer_rounds: int = 3
    stories: int = 300
    request_queries: int = 400
    """Trained and held-out concepts each (requests in held-out forms)."""
    captions: int = 200
    """Images per caption set (greedy decoding is the slow part)."""
    heldout_fraction: float = 0.1
    """Must match the model's training data config (read from the checkpoint when present)."""
    seed: int = 0


@dataclass
class ExampleQuery:
    """One query for the plot: what was asked and the five best images."""

    title: str
    query: str
    images: list[str]
    correct: list[bool]


@dataclass
class OfflineRun:
    results: list[TaskResult] = field(default_factory=list)
    examples: list[ExampleQuery] = field(default_factory=list)


def run_offline(ev: Evaluator, settings: OfflineSettings) -> OfflineRun:
    run = OfflineRun()
    for task in (
        emoji_cross_style,
        dialogue_retrieval,
        answer_selection,
        story_retrieval,
        emoji_requests,
        greedy_caption_match,
    ):
        result, examples = task(ev, settings)
        run.results.append(result)
        run.examples += examples
    return run


# ---------------------------------------------------------------------------------------- (a)


def _gallery(
    ev: Evaluator, examples: list[Example], desc: str
) -> tuple[list[Example], torch.Tensor, torch.Tensor]:
    """Encode the examples' images; → (readable examples, (N, F) features, (N, R) embeddings)."""
    encoded = ev.encode_images([e.image for e in examples], desc=desc)
    row = {p: i for i, p in enumerate(encoded.paths)}
    kept = [e for e in examples if e.image in row]
    feats = encoded.features[torch.tensor([row[e.image] for e in kept])]
    return kept, feats, ev.image_embeddings(feats)


def _top5(scores: torch.Tensor, paths: list[str], correct: list[bool]) -> tuple[list[str], list[bool]]:
    top = scores.topk(min(5, scores.shape[0])).indices.tolist()
    return [paths[j] for j in top], [correct[j] for j in top]


def emoji_cross_style(ev: Evaluator, s: OfflineSettings) -> tuple[TaskResult, list[ExampleQuery]]:
    gallery, _, images = _gallery(ev, emoji_examples("twitter", "all", s.heldout_fraction), "twitter emoji")
    names = [e.caption for e in gallery]
    texts = ev.query_embeddings([[n] for n in names], desc="emoji names")
    scores = cosine_scores(texts, images)
    rows = []
    for split, held in (("trained concepts", False), ("held-out concepts", True)):
        q = [i for i, n in enumerate(names) if is_heldout(n, s.heldout_fraction) == held]
        metrics = group_metrics(scores[q], [names[i] for i in q], names)
        rows.append(Row("fromage", split, metrics))
        rows.append(Row("baseline", split, dict.fromkeys(metrics), NO_TEXT_TOWER))
    counts = {"gallery": len(gallery), "queries": len(names)}
    counts["skipped_unreadable"] = len(emoji_examples("twitter", "all", s.heldout_fraction)) - len(gallery)
    paths = [e.image for e in gallery]
    examples = []
    for name in ("red apple", "birthday cake", "dog face"):
        if name in names:
            i = names.index(name)
            top, ok = _top5(scores[i], paths, [n == name for n in names])
            examples.append(ExampleQuery("emoji → Twitter", name, top, ok))
    result = TaskResult("emoji cross-style retrieval (name → Twitter rendering)", rows, counts)
    return result, examples


# ---------------------------------------------------------------------------------------- (b)


def _easyvqa_gallery(ev: Evaluator):
    items = easyvqa_images("test")
    examples = [Example(i.image, f"a {i.color} {i.shape}", "easyvqa", f"{i.color} {i.shape}") for i in items]
    kept, feats, images = _gallery(ev, examples, "easy-VQA test")
    by_path = {i.image: i for i in items}
    return [by_path[e.image] for e in kept], feats, images


def dialogue_retrieval(ev: Evaluator, s: OfflineSettings) -> tuple[TaskResult, list[ExampleQuery]]:
    items, _, images = _easyvqa_gallery(ev)
    rng = random.Random(s.seed)
    queries: list[int] = []
    texts: list[str] = []
    undetermined = 0
    for j, item in enumerate(items):
        if len(queries) == s.dialogue_queries:
            break
        dialogue = determining_dialogue(item.qa, rng)
        if dialogue is None:
            undetermined += 1
            continue
        queries.append(j)
        texts.append(dialogue.text())
    scores = cosine_scores(ev.query_embeddings([[t] for t in texts], desc="dialogues"), images)
    groups = [f"{i.color} {i.shape}" for i in items]
    metrics = group_metrics(scores, [groups[j] for j in queries], groups)
    rounds = [t.count("Q: ") for t in texts]
    rows = [
        Row("fromage", "2–4 rounds", metrics),
        Row("baseline", "2–4 rounds", dict.fromkeys(metrics), NO_TEXT_TOWER),
    ]
    counts = {
        "gallery": len(items),
        "queries": len(queries),
        "skipped_rounds_do_not_determine_the_image": undetermined,
        **{f"queries_with_{n}_rounds": rounds.count(n) for n in sorted(set(rounds))},
    }
    paths = [i.image for i in items]
    examples = []
    for q in range(min(2, len(texts))):
        top, ok = _top5(scores[q], paths, [g == groups[queries[q]] for g in groups])
        examples.append(ExampleQuery("dialogue → easy-VQA image", texts[q], top, ok))
    return TaskResult("easy-VQA dialogue retrieval (VisDial text→image protocol)", rows, counts), examples


# ---------------------------------------------------------------------------------------- (c)


def _question_kind(answer: str) -> str:
    return "colour" if answer in EASYVQA_COLORS else "shape" if answer in EASYVQA_SHAPES else "yes/no"


def answer_selection(ev: Evaluator, s: OfflineSettings) -> tuple[TaskResult, list[ExampleQuery]]:
    items, feats, _ = _easyvqa_gallery(ev)
    rng = random.Random(s.seed + 1)
    candidates = [f" {a}" for a in EASYVQA_ANSWERS]
    prompts: list[list] = []
    targets, kinds = [], []
    chosen = items[: s.answer_images]
    for j, item in enumerate(chosen):
        rounds = list(item.qa)
        rng.shuffle(rounds)
        rounds = rounds[: s.answer_rounds]
        for r, (question, answer) in enumerate(rounds):
            text = " ".join(p for p in (format_rounds(rounds[:r]), ask(question)) if p)
            prompts.append([feats[j], text])
            targets.append(EASYVQA_ANSWERS.index(answer))
            kinds.append(_question_kind(answer))
    with_image = ev.shared_answer_scores(prompts, candidates, desc="answers with the image")
    without = ev.shared_answer_scores([p[1:] for p in prompts], candidates, desc="answers without it")
    target_t = torch.tensor(targets)
    rows = []
    for system, table in (("fromage", with_image), ("baseline: LM without the image", without)):
        scores = table
        metrics: dict[str, float | None] = {
            "R@1": recall_at_k(scores, target_t, (1,))["R@1"],
            "MRR": mean_reciprocal_rank(scores, target_t),
        }
        for kind in ("colour", "shape", "yes/no"):
            q = [i for i, k in enumerate(kinds) if k == kind]
            metrics[f"R@1 {kind}"] = recall_at_k(scores[q], target_t[q], (1,))["R@1"] if q else None
        rows.append(Row(system, "image + earlier rounds → 13 answers", metrics))
    counts = {"images": len(chosen), "rounds": len(targets)}
    return TaskResult("easy-VQA answer selection (VisDial answer protocol)", rows, counts), []


# ---------------------------------------------------------------------------------------- (d)


def emoji_families(examples: list[Example], min_size: int = 5) -> dict[str, list[int]]:
    """Names sharing their last word ("red heart", "blue heart") whose other words are left
    when that word goes: family word → example indices, for families of at least `min_size`."""
    families: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        words = e.caption.split()
        if len(words) >= 2:
            families[words[-1]].append(i)
    return {w: idx for w, idx in families.items() if len(idx) >= min_size}


SETTINGS = ("1 caption", "5 captions", "5 captions + 4 images")


def story_prompts(captions: list[str], images: list[torch.Tensor], family_word: str) -> dict[str, list]:
    """The three VIST context settings for one story; the last caption drops the family word."""
    last = " ".join(w for w in captions[-1].split() if w != family_word)
    full: list = []
    text_only = []
    for cap, img in zip(captions[:-1], images[:-1], strict=True):
        full += [f"{cap}.", img]
        text_only.append(f"{cap}.")
    return {
        SETTINGS[0]: [last],
        SETTINGS[1]: [" ".join([*text_only, last])],
        SETTINGS[2]: [*full, last],
    }


def story_retrieval(ev: Evaluator, s: OfflineSettings) -> tuple[TaskResult, list[ExampleQuery]]:
    gallery, feats, images = _gallery(ev, emoji_examples("google", "all", s.heldout_fraction), "google emoji")
    trained = [i for i, e in enumerate(gallery) if not is_heldout(e.caption, s.heldout_fraction)]
    families = {
        word: idx
        for word, idx in emoji_families([gallery[i] for i in trained]).items()
        if not is_story_training_family(word)
    }
    rng = random.Random(s.seed + 2)
    words = sorted(families)
    stories = []  # (family word, five gallery rows)
    for _ in range(s.stories):
        word = rng.choice(words)
        stories.append((word, [trained[i] for i in rng.sample(families[word], 5)]))
    prompts: dict[str, list] = {k: [] for k in SETTINGS}
    for word, rows in stories:
        built = story_prompts([gallery[r].caption for r in rows], [feats[r] for r in rows], word)
        for k in SETTINGS:
            prompts[k].append(built[k])
    targets = torch.tensor([rows[-1] for _, rows in stories])
    context = [rows[:-1] for _, rows in stories]
    table_rows, all_scores = [], {}
    for k in SETTINGS:
        scores = exclude(
            cosine_scores(ev.query_embeddings(prompts[k], desc=f"stories: {k}"), images), context
        )
        all_scores[k] = scores
        table_rows.append(Row("fromage", k, retrieval_metrics(scores, targets)))
    base = exclude(mean_context_baseline([feats[c] for c in context], feats), context)
    for k in SETTINGS[:2]:
        table_rows.append(Row("baseline", k, dict.fromkeys(["R@1", "R@5", "R@10", "MRR"]), NO_TEXT_TOWER))
    table_rows.append(
        Row("baseline", SETTINGS[2], retrieval_metrics(base, targets), "mean of the 4 context images")
    )
    counts = {"stories": len(stories), "families": len(families), "gallery": len(gallery)}
    paths = [e.image for e in gallery]
    examples = []
    for q in range(min(2, len(stories))):
        word, rows = stories[q]
        query = " ".join(str(p) if isinstance(p, str) else "[img]" for p in prompts[SETTINGS[2]][q])
        top, ok = _top5(all_scores[SETTINGS[2]][q], paths, [j == rows[-1] for j in range(len(paths))])
        examples.append(ExampleQuery("story → next emoji (5 captions + 4 images)", query, top, ok))
    result = TaskResult("emoji story retrieval (VIST protocol, three context settings)", table_rows, counts)
    return result, examples


def checkpoint_heldout_fraction(checkpoint: str | Path, default: float = 0.1) -> float:
    """The concept split the model trained with (saved in its config), so held-out stays held out."""
    data = training_record(checkpoint).get("train_config", {}).get("data", {})
    return float(data.get("heldout_concept_fraction", default))


DATA_INFO = {"emoji": f"emoji-datasource-google/twitter@{EMOJI_VERSION}", "easy-vqa": "easy-vqa==1.0"}


# ---------------------------------------------------------------------------------------- (e)


def emoji_requests(ev: Evaluator, s: OfflineSettings) -> tuple[TaskResult, list[ExampleQuery]]:
    """Name, training-form request and held-out-form requests → every Google emoji."""
    gallery, _, images = _gallery(ev, emoji_examples("google", "all", s.heldout_fraction), "google emoji")
    names = [e.caption for e in gallery]
    rng = random.Random(s.seed + 3)
    rows = []
    counts: dict[str, int] = {"gallery": len(gallery)}
    for split, held in (("trained concepts", False), ("held-out concepts", True)):
        pool = [i for i, n in enumerate(names) if is_heldout(n, s.heldout_fraction) == held]
        q = sorted(rng.sample(pool, min(s.request_queries, len(pool))))
        counts[f"queries_{split.split()[0]}"] = len(q)
        others = [i for i in range(len(names)) if i not in set(q)]
        settings: dict[str, list[list]] = {
            "name": [[names[i]] for i in q],
            "request, a training form": [[request_forms(names[i], 1)[0]] for i in q],
            "request, held-out forms": [[held_out_request(names[i], j)] for j, i in enumerate(q)],
        }
        unrelated = []
        for j, i in enumerate(q):  # an earlier exchange about another emoji, in the chat format
            other = rng.choice(others)
            earlier = request_forms(names[other], 1)[0]
            unrelated.append([earlier, "\n", Path(gallery[other].image), "\n", held_out_request(names[i], j)])
        settings["held-out forms after an unrelated turn"] = unrelated
        for setting, prompts in settings.items():
            features = [_image_pieces(ev, p) for p in prompts]
            scores = cosine_scores(ev.query_embeddings(features, desc=f"requests: {setting}"), images)
            metrics = group_metrics(scores, [names[i] for i in q], names)
            rows.append(Row("fromage", f"{split}: {setting}", metrics))
    return TaskResult("emoji requests (text → every Google emoji)", rows, counts), []


def _image_pieces(ev: Evaluator, prompt: list) -> list:
    """Paths in a prompt → their (F,) features (the Evaluator's prompts hold features)."""
    paths = [str(p) for p in prompt if isinstance(p, Path)]
    if not paths:
        return prompt
    encoded = ev.encode_images(paths, desc="context images")
    row = {p: i for i, p in enumerate(encoded.paths)}
    return [encoded.features[row[str(p)]] if isinstance(p, Path) else p for p in prompt]


# ---------------------------------------------------------------------------------------- (f)


def greedy_caption_match(ev: Evaluator, s: OfflineSettings) -> tuple[TaskResult, list[ExampleQuery]]:
    """Greedy captions (`[img][BOS]` → text) that equal the caption exactly (case-folded)."""
    rng = random.Random(s.seed + 4)
    google = emoji_examples("google", "all", s.heldout_fraction)
    twitter = emoji_examples("twitter", "all", s.heldout_fraction)
    easy = [Example(i.image, f"a {i.color} {i.shape}", "easyvqa") for i in easyvqa_images("test")]
    sets = {
        "Google emoji, trained concepts": [
            e for e in google if not is_heldout(e.caption, s.heldout_fraction)
        ],
        "Google emoji, held-out concepts": [e for e in google if is_heldout(e.caption, s.heldout_fraction)],
        "Twitter emoji, trained concepts": [
            e for e in twitter if not is_heldout(e.caption, s.heldout_fraction)
        ],
        "easy-VQA test images": easy,
    }
    rows, counts = [], {}
    for name, pool in sets.items():
        chosen = sorted(rng.sample(range(len(pool)), min(s.captions, len(pool))))
        kept, feats, _ = _gallery(ev, [pool[i] for i in chosen], name)
        captions = ev.captions(feats, desc=f"captions: {name}")
        exact = [
            c.strip().lower().rstrip(".") == e.caption.lower() for c, e in zip(captions, kept, strict=True)
        ]
        rows.append(Row("fromage", name, {"exact": sum(exact) / max(len(exact), 1)}))
        counts[name] = len(kept)
    return TaskResult("greedy captions (exact match)", rows, counts), []
