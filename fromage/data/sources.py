"""Data sources: one dispatch and one naming for every command that reads images.

A source is one of
- a built-in set: `emoji-google`, `emoji-twitter` (every concept), `easyvqa-train`, `easyvqa-test`;
- a folder of images (no captions: indexing and feature extraction only);
- a `.tsv` / `.jsonl` collection file (data/readers.py);
- webdataset `.tar` shards, a pattern such as `data/{00000..00099}.tar` (data/shards.py).

Training also takes two families, each a training set plus the validation sets it is scored on:
`emoji` (Google renderings of the trained concepts; validated on all Google and all Twitter
renderings) and `easyvqa` (the training images, validated on the test images).
"""

from __future__ import annotations

import os
from pathlib import Path

from .builtin import easyvqa_examples, emoji_examples
from .examples import Example
from .readers import BadInputLog, read_collection
from .shards import is_shard_source, read_shards

BUILTIN_SETS = ("emoji-google", "emoji-twitter", "easyvqa-train", "easyvqa-test")
TRAINING_FAMILIES = ("emoji", "easyvqa")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def builtin_set(name: str, heldout_fraction: float = 0.1, easyvqa_per_class: int = 0) -> list[Example]:
    """A built-in set by its name (BUILTIN_SETS); emoji sets hold every concept."""
    if name not in BUILTIN_SETS:
        raise ValueError(f"unknown built-in set {name!r}; known: {', '.join(BUILTIN_SETS)}")
    kind, variant = name.split("-", 1)
    if kind == "emoji":
        return emoji_examples(variant, "all", heldout_fraction)
    return easyvqa_examples(variant, easyvqa_per_class)


def family_sets(
    family: str, heldout_fraction: float, easyvqa_per_class: int = 0, styles: tuple[str, ...] = ("google",)
) -> tuple[list[Example], dict[str, list[Example]]]:
    """A training family → (training examples, validation sets by name). `styles`: the emoji
    drawing styles trained on (validation stays Google + Twitter)."""
    if family == "emoji":
        train = [e for style in styles for e in emoji_examples(style, "train", heldout_fraction)]
        # Galleries hold every concept; queries are scored per trained/held-out concept.
        return train, {
            name: builtin_set(name, heldout_fraction) for name in ("emoji-google", "emoji-twitter")
        }
    if family == "easyvqa":
        return easyvqa_examples("train", easyvqa_per_class), {"easyvqa-test": easyvqa_examples("test", 4)}
    raise ValueError(f"unknown training family {family!r}; known: {', '.join(TRAINING_FAMILIES)}")


def _folder_images(root: Path, bad: BadInputLog) -> list[Path]:
    """Image files under `root`, following links to folders once each: a link back to a folder
    already walked (a loop) is counted as bad input and skipped, not walked forever or dropped
    unsaid."""
    seen: set[tuple[int, int]] = set()
    found: list[Path] = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            bad.add("symlink loop", f"{folder}: a link back to a folder already read; skipped")
            dirs[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirs.sort()
        for name in sorted(files):
            file = Path(folder) / name
            if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
                found.append(file)
    return found


def read_source(source: str, image_dir: str | None, bad: BadInputLog) -> list[Example]:
    """Every image a source names, with its caption when the source has one."""
    if source in BUILTIN_SETS:
        return builtin_set(source)
    path = Path(source)
    if path.is_dir():
        return [Example(str(p), "", "folder") for p in _folder_images(path, bad)]
    if is_shard_source(source):  # webdataset shards: `data/{00000..00099}.tar`, `data/*.tar`
        return read_shards(source, bad)
    if path.is_file():
        return read_collection(path, image_dir, bad)
    raise FileNotFoundError(
        f"source {source!r} is not a folder, a .tsv/.jsonl file, .tar shards, or one of "
        f"{', '.join(BUILTIN_SETS)}"
    )
