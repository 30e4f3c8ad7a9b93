"""Loaders for the published benchmark files: VIST story-in-sequence and VisDial v1.0.

Pure Python (json + pathlib), importing nothing from the package. Every loader returns its
items together with `skipped`, a count per reason of what it left out, and raises
`FormatError` (a `ValueError` naming the file and the offending spot) when a file does not
have the published structure. Nothing is dropped without being counted; an item is counted
once, under the first reason that applies. (Over 400 lines: most of it is the record of
what the published evaluation did, kept next to the code that reproduces it.)

What FROMAGe's own evaluation did, read from kohjingyu/fromage `evals/eval_vist_retrieval.py`
(commit 59fdb63) and `evals/eval_visdial_generation.py` (commit 51fb06a):

VIST contextual image retrieval
  - Captions come from the storylet field "text" (lower-cased, tokenised, names replaced by
    "[male]"/"[female]"...), not "original_text". `load_vist` defaults to "text".
  - Candidates: every distinct `photo_flickr_id` referenced by any storylet of the val file
    whose image could be fetched, i.e. the images of all stories, not only the last image of
    each. A story's own four context images are pushed to the bottom (score - 10000) before
    ranking; the target is the story's fifth image. A story is evaluated only if all five of
    its images are available, but the images of a skipped story still stay candidates. Hence
    `VistData.candidates` covers every referenced image found on disk, skipped stories
    included.
  - The script groups storylets by story in file order and takes `story[-1]` as the target
    without sorting by "worker_arranged_photo_order" (it stores the order and never uses it).
    That is only right if the file lists storylets in order; `load_vist` sorts explicitly.

VisDial dense annotations (NDCG)
  - `round_id` in `visdial_1.0_val_dense_annotations.json` is 1-based (1..10): the official
    batra-mlp-lab/visdial-challenge-starter-pytorch `evaluate.py` selects
    `output[:, round_id - 1, :]` and says "round ids are 1-10, not 0-9"; vmurahari3/visdial-bert
    `dataloader/dataloader_dense_annotations.py` also uses `round_id - 1`. FROMAGe's script
    indexes `i * 10 + round_id` without the `- 1`, scoring the round after the annotated one.
    `load_visdial_dense` keys by the 0-based index `round_id - 1`.
  - Relevance lives in "gt_relevance" in the val file (starter `visdialch/data/readers.py`,
    `DenseAnnotationsReader`: keys image_id, round_id, gt_relevance); visdial-bert reads
    "relevance" from the train dense sample. We read "gt_relevance", else "relevance".
  - Question strings are stored without the trailing "?" (the starter appends "?" before
    tokenising; FROMAGe writes "Q: " + q + "?"). Loaders return the strings as stored.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VIST_STORY_LENGTH = 5
VIST_TEXT_FIELDS = ("text", "original_text")
# Extensions tried for a VIST photo id, most preferred first ("" = a file with no suffix).
VIST_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", "")

VISDIAL_MAX_ROUNDS = 10
# File names per split as distributed: val/test images were collected for VisDial v1.0,
# train reuses COCO train2014 + val2014.
VISDIAL_IMAGE_PATTERNS = {
    "val": ("VisualDialog_val2018_{image_id:012d}.jpg",),
    "test": ("VisualDialog_test2018_{image_id:012d}.jpg",),
    "train": ("COCO_train2014_{image_id:012d}.jpg", "COCO_val2014_{image_id:012d}.jpg"),
}
# Sub-folders the official zips unpack to, also searched under the image directory.
VISDIAL_IMAGE_SUBDIRS = {
    "val": ("VisualDialog_val2018",),
    "test": ("VisualDialog_test2018",),
    "train": ("train2014", "val2014"),
}


# The official JSON files name their split "train" (v1.0: also "train2018"), "val2018" and
# "test2018"; the short names are what earlier releases and most tools write.
VISDIAL_SPLIT_NAMES = {
    "train": "train",
    "train2018": "train",
    "val": "val",
    "val2018": "val",
    "test": "test",
    "test2018": "test",
}


class FormatError(ValueError):
    """A benchmark file without the published structure."""

    def __init__(self, path: Path, where: str, problem: str) -> None:
        super().__init__(f"{path}: {where}: {problem}")


# --------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise FormatError(path, f"line {e.lineno}", f"not valid JSON ({e.msg})") from e


def _kind(value: Any) -> str:
    return type(value).__name__


def _mapping(value: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(path, where, f"expected an object, got {_kind(value)}")
    return value


def _list(value: Any, path: Path, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise FormatError(path, where, f"expected a list, got {_kind(value)}")
    return value


def _key(obj: dict[str, Any], key: str, path: Path, where: str) -> Any:
    if key not in obj:
        raise FormatError(path, where, f"missing key {key!r} (has {sorted(obj)})")
    return obj[key]


def _int(value: Any, path: Path, where: str) -> int:
    # bool is an int in Python; a true/false here is a broken file, not an index.
    if not isinstance(value, int) or isinstance(value, bool):
        raise FormatError(path, where, f"expected an integer, got {_kind(value)} {value!r}")
    return value


def _str(value: Any, path: Path, where: str) -> str:
    if not isinstance(value, str):
        raise FormatError(path, where, f"expected a string, got {_kind(value)}")
    return value


def _index(value: Any, table: list[str], name: str, path: Path, where: str) -> str:
    i = _int(value, path, where)
    if not 0 <= i < len(table):
        raise FormatError(path, where, f"index {i} outside data.{name} (length {len(table)})")
    return table[i]


def _need_dir(image_dir: Path) -> None:
    # A wrong directory would otherwise show up as "every item skipped": fail at once.
    if not image_dir.is_dir():
        raise NotADirectoryError(f"image directory {image_dir} does not exist")


# --------------------------------------------------------------------------- VIST


@dataclass(frozen=True)
class VistStory:
    """One five-sentence story, sorted by "worker_arranged_photo_order"."""

    story_id: str
    captions: tuple[str, ...]  # (5,)
    images: tuple[Path, ...]  # (5,) image file of each caption
    image_ids: tuple[str, ...]  # (5,) photo_flickr_id of each image, for candidate exclusion

    def __post_init__(self) -> None:
        n = {len(self.captions), len(self.images), len(self.image_ids)}
        if n != {VIST_STORY_LENGTH}:
            raise ValueError(
                f"story {self.story_id}: {len(self.captions)} captions, {len(self.images)} images, "
                f"{len(self.image_ids)} image ids; expected {VIST_STORY_LENGTH} of each"
            )


@dataclass(frozen=True)
class VistData:
    """Stories usable for retrieval, the candidate pool, and what was left out.

    `candidates` maps every photo id referenced in the file whose image exists to its file,
    in first-seen order, including images of skipped stories (FROMAGe's pool). `skipped`
    keys: "stories_missing_image", "stories_wrong_length" (not 5 storylets),
    "stories_bad_order" (orders not 0..4), and "images_missing" (distinct photo ids without
    a file, absent from `candidates`).
    """

    stories: list[VistStory]
    candidates: dict[str, Path]
    skipped: dict[str, int]


def _index_images(dirs: list[Path]) -> dict[str, Path]:
    """photo id → file, scanning each directory once. Earlier directories win, then
    extensions in `VIST_IMAGE_EXTENSIONS` order, so the choice per id is made once."""
    rank = {ext: i for i, ext in enumerate(VIST_IMAGE_EXTENSIONS)}
    best: dict[str, tuple[int, int, Path]] = {}
    for d, directory in enumerate(dirs):
        for entry in directory.iterdir():
            ext = entry.suffix.lower()
            if ext not in rank or not entry.is_file():
                continue
            key = (d, rank[ext], entry)
            stem = entry.stem if ext else entry.name
            if stem not in best or key[:2] < best[stem][:2]:
                best[stem] = key
    return {stem: entry for stem, (_, _, entry) in best.items()}


def load_vist(sis_json: str | Path, image_dir: str | Path, *, text_field: str = "text") -> VistData:
    """Read a VIST `*.story-in-sequence.json` and find each photo in `image_dir`.

    Images are `{photo_flickr_id}.{ext}` directly in `image_dir`, or in its split sub-folder
    named after the json (`val/` for `val.story-in-sequence.json`), as the VIST image archives
    unpack. `text_field` is "text" (FROMAGe's choice) or "original_text".
    """
    path, image_dir = Path(sis_json), Path(image_dir)
    if text_field not in VIST_TEXT_FIELDS:
        raise ValueError(f"text_field must be one of {VIST_TEXT_FIELDS}, got {text_field!r}")
    _need_dir(image_dir)
    top = _mapping(_read_json(path), path, "top level")
    annotations = _list(_key(top, "annotations", path, "top level"), path, "annotations")

    # story_id → [(order, caption, photo id)], stories in first-seen order.
    storylets: dict[str, list[tuple[int, str, str]]] = {}
    for i, entry in enumerate(annotations):
        where = f"annotations[{i}]"
        if not isinstance(entry, list) or len(entry) != 1:
            size = f" of length {len(entry)}" if isinstance(entry, list) else ""
            raise FormatError(
                path, where, f"expected a one-element list holding a storylet, got {_kind(entry)}{size}"
            )
        s = _mapping(entry[0], path, f"{where}[0]")
        story_id = str(_key(s, "story_id", path, f"{where}[0]"))
        photo = str(_key(s, "photo_flickr_id", path, f"{where}[0]"))
        order = _int(_key(s, "worker_arranged_photo_order", path, f"{where}[0]"), path, f"{where}[0]")
        text = _str(_key(s, text_field, path, f"{where}[0]"), path, f"{where}[0].{text_field}")
        storylets.setdefault(story_id, []).append((order, text, photo))

    split_dir = image_dir / path.name.split(".")[0]
    found = _index_images([image_dir] + ([split_dir] if split_dir.is_dir() else []))

    candidates: dict[str, Path] = {}
    missing: set[str] = set()
    for parts in storylets.values():
        for _, _, photo in parts:
            if photo in found:
                candidates.setdefault(photo, found[photo])
            else:
                missing.add(photo)

    stories: list[VistStory] = []
    skipped: Counter[str] = Counter()
    for story_id, parts in storylets.items():
        if len(parts) != VIST_STORY_LENGTH:
            skipped["stories_wrong_length"] += 1
            continue
        parts = sorted(parts, key=lambda p: p[0])
        if [p[0] for p in parts] != list(range(VIST_STORY_LENGTH)):
            skipped["stories_bad_order"] += 1
            continue
        if any(photo in missing for _, _, photo in parts):
            skipped["stories_missing_image"] += 1
            continue
        stories.append(
            VistStory(
                story_id=story_id,
                captions=tuple(text for _, text, _ in parts),
                images=tuple(candidates[photo] for _, _, photo in parts),
                image_ids=tuple(photo for _, _, photo in parts),
            )
        )
    if missing:
        skipped["images_missing"] = len(missing)
    return VistData(stories=stories, candidates=candidates, skipped=dict(skipped))


# --------------------------------------------------------------------------- VisDial


@dataclass(frozen=True)
class VisDialRound:
    """One question/answer round; `options[gt_index] == answer`."""

    question: str  # as stored, without the trailing "?"
    answer: str
    options: tuple[str, ...]  # (100,) in the official files
    gt_index: int

    def __post_init__(self) -> None:
        if not 0 <= self.gt_index < len(self.options):
            raise ValueError(f"gt_index {self.gt_index} outside {len(self.options)} options")


@dataclass(frozen=True)
class VisDialDialog:
    image_id: int
    image: Path
    caption: str
    rounds: tuple[VisDialRound, ...]  # in dialogue order; round k has 0-based index k


@dataclass(frozen=True)
class VisDialData:
    """Dialogues with an image and ground truth for every round.

    `skipped` keys: "dialogs_missing_image", "dialogs_without_ground_truth" (a round lacks
    "answer", "answer_options" or "gt_index", as in the test split).
    """

    dialogs: list[VisDialDialog]
    split: str
    skipped: dict[str, int]


def _visdial_finder(image_dir: Path, split: str, pattern: str | None) -> Callable[[int], Path | None]:
    split = VISDIAL_SPLIT_NAMES.get(split, split)
    if pattern is not None:
        if "{image_id" not in pattern:
            raise ValueError(f"image_pattern {pattern!r} has no {{image_id}} field")
        patterns: tuple[str, ...] = (pattern,)
    elif split in VISDIAL_IMAGE_PATTERNS:
        patterns = VISDIAL_IMAGE_PATTERNS[split]
    else:
        raise ValueError(f"no known image names for split {split!r}; pass image_pattern")
    dirs = [image_dir] + [
        image_dir / sub for sub in VISDIAL_IMAGE_SUBDIRS.get(split, ()) if (image_dir / sub).is_dir()
    ]

    def find(image_id: int) -> Path | None:
        for directory in dirs:
            for p in patterns:
                candidate = directory / p.format(image_id=image_id, split=split)
                if candidate.is_file():
                    return candidate
        return None

    return find


def load_visdial(
    json_path: str | Path, image_dir: str | Path, *, image_pattern: str | None = None
) -> VisDialData:
    """Read an official `visdial_1.0_{split}.json` and find each dialogue's image.

    Image names follow the split in the file ("val" → `VisualDialog_val2018_{id:012d}.jpg`,
    "train" → COCO 2014 names), in `image_dir` or the sub-folder the zip unpacks to.
    `image_pattern` (fields `{image_id}`, `{split}`) overrides the names.
    """
    path, image_dir = Path(json_path), Path(image_dir)
    _need_dir(image_dir)
    top = _mapping(_read_json(path), path, "top level")
    split = _str(_key(top, "split", path, "top level"), path, "split")
    data = _mapping(_key(top, "data", path, "top level"), path, "data")
    questions = _list(_key(data, "questions", path, "data"), path, "data.questions")
    answers = _list(_key(data, "answers", path, "data"), path, "data.answers")
    dialogs = _list(_key(data, "dialogs", path, "data"), path, "data.dialogs")
    find = _visdial_finder(image_dir, split, image_pattern)

    out: list[VisDialDialog] = []
    skipped: Counter[str] = Counter()
    for d, raw in enumerate(dialogs):
        where = f"data.dialogs[{d}]"
        dialog = _mapping(raw, path, where)
        image_id = _int(_key(dialog, "image_id", path, where), path, f"{where}.image_id")
        caption = _str(_key(dialog, "caption", path, where), path, f"{where}.caption")
        raw_rounds = _list(_key(dialog, "dialog", path, where), path, f"{where}.dialog")
        rounds: list[VisDialRound] = []
        complete = True
        for r, raw_round in enumerate(raw_rounds):
            rw = f"{where}.dialog[{r}]"
            rnd = _mapping(raw_round, path, rw)
            question = _index(_key(rnd, "question", path, rw), questions, "questions", path, f"{rw}.question")
            if not all(k in rnd for k in ("answer", "answer_options", "gt_index")):
                complete = False  # test split: no ground truth to score against
                continue
            answer = _index(rnd["answer"], answers, "answers", path, f"{rw}.answer")
            raw_options = _list(rnd["answer_options"], path, f"{rw}.answer_options")
            options = tuple(
                _index(o, answers, "answers", path, f"{rw}.answer_options[{k}]")
                for k, o in enumerate(raw_options)
            )
            gt_index = _int(rnd["gt_index"], path, f"{rw}.gt_index")
            if not 0 <= gt_index < len(options):
                raise FormatError(path, f"{rw}.gt_index", f"{gt_index} outside {len(options)} options")
            if raw_options[gt_index] != rnd["answer"]:
                raise FormatError(
                    path,
                    f"{rw}.gt_index",
                    f"answer_options[{gt_index}] is answer {raw_options[gt_index]} but the round's answer is {rnd['answer']}",
                )
            rounds.append(VisDialRound(question, answer, options, gt_index))
        if not complete:
            skipped["dialogs_without_ground_truth"] += 1
            continue
        image = find(image_id)
        if image is None:
            skipped["dialogs_missing_image"] += 1
            continue
        out.append(VisDialDialog(image_id=image_id, image=image, caption=caption, rounds=tuple(rounds)))
    return VisDialData(dialogs=out, split=split, skipped=dict(skipped))


def load_visdial_dense(json_path: str | Path) -> dict[tuple[int, int], tuple[float, ...]]:
    """Read `visdial_1.0_val_dense_annotations.json` (or the train dense sample).

    Returns (image_id, 0-based round index) → relevance of each answer option. The file's
    `round_id` is 1-based (official starter: `output[:, round_id - 1]`), so the key holds
    `round_id - 1`. Relevance is read from "gt_relevance" (val), else "relevance" (train).
    """
    path = Path(json_path)
    entries = _list(_read_json(path), path, "top level")
    out: dict[tuple[int, int], tuple[float, ...]] = {}
    for i, raw in enumerate(entries):
        where = f"[{i}]"
        entry = _mapping(raw, path, where)
        image_id = _int(_key(entry, "image_id", path, where), path, f"{where}.image_id")
        round_id = _int(_key(entry, "round_id", path, where), path, f"{where}.round_id")
        if not 1 <= round_id <= VISDIAL_MAX_ROUNDS:
            raise FormatError(
                path, f"{where}.round_id", f"{round_id} outside 1..{VISDIAL_MAX_ROUNDS} (1-based)"
            )
        key = "gt_relevance" if "gt_relevance" in entry else "relevance"
        if key not in entry:
            raise FormatError(path, where, f"missing key 'gt_relevance' or 'relevance' (has {sorted(entry)})")
        values = _list(entry[key], path, f"{where}.{key}")
        for k, v in enumerate(values):
            if not isinstance(v, int | float) or isinstance(v, bool):
                raise FormatError(path, f"{where}.{key}[{k}]", f"expected a number, got {_kind(v)}")
        if (image_id, round_id - 1) in out:
            raise FormatError(path, where, f"second entry for image {image_id} round_id {round_id}")
        out[(image_id, round_id - 1)] = tuple(float(v) for v in values)
    return out
