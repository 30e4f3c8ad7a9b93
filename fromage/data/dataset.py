"""From a `DataConfig` to training/validation examples with cached frozen features."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..backbones.vision import FrozenImageEncoder
from ..config import DataConfig
from ..fileio import stable_bucket
from ..paths import subdir
from .augment import restyle
from .digest import file_digest
from .examples import Example
from .feature_cache import FeatureCache
from .images import ImageError, load_image
from .readers import BadInputLog, read_collection
from .shards import holdout_key, is_shard_source, read_shards, shard_set_name
from .sources import TRAINING_FAMILIES, family_sets


@dataclass
class Split:
    examples: list[Example]
    features: torch.Tensor
    """(V, N, F): view 0 is the image itself, views 1.. are augmented renderings."""

    def __len__(self) -> int:
        return len(self.examples)


def build_examples(config: DataConfig, bad: BadInputLog) -> tuple[list[Example], dict[str, list[Example]]]:
    """Training examples and named validation sets for the configured sources."""
    train: list[Example] = []
    val: dict[str, list[Example]] = {}
    for source in config.sources:
        if source in TRAINING_FAMILIES:
            family_train, family_val = family_sets(
                source, config.heldout_concept_fraction, config.easyvqa_per_class, tuple(config.emoji_styles)
            )
            train += family_train
            val.update(family_val)
        elif is_shard_source(source):
            # Webdataset shards (data/shards.py): the same stable 1% (at most 500) holdout,
            # hashed on shard file name + member so it does not depend on where shards live.
            rows = read_shards(source, bad)
            held = [r for r in rows if stable_bucket(holdout_key(r)) < 100][:500]
            held_set = {id(r) for r in held}
            train += [r for r in rows if id(r) not in held_set]
            if held:
                val[shard_set_name(source)] = held
        else:
            path = Path(source)
            if not path.exists():
                raise FileNotFoundError(
                    f"data source {source!r} is neither a training family ({', '.join(TRAINING_FAMILIES)}) "
                    "nor a .tsv/.jsonl file nor .tar shards"
                )
            rows = read_collection(path, config.image_dir or None, bad)
            # A stable 1% (at most 500) of a file's rows is held out for validation.
            # Hash the path as written relative to the file, so every machine holds out the same rows.
            held = [r for r in rows if stable_bucket(os.path.relpath(r.image, path.parent)) < 100][:500]
            held_set = {id(r) for r in held}
            train += [r for r in rows if id(r) not in held_set]
            if held:
                val[path.stem] = held
    if not train:
        raise ValueError(f"no training examples in sources {config.sources}")
    return train, val


@dataclass
class CacheFill:
    """What `fill_cache` did: which examples are usable and how many features it computed."""

    kept: list[int]
    """Indices of the examples whose image was read and decoded, in order."""
    keys: list[list[str]]
    """keys[v][j]: the cache key of view v of `examples[kept[j]]`."""
    encoded: int
    """(image, view) features computed and written by this call."""
    cached: int
    """(image, view) features that were in the cache already."""


def fill_cache(
    examples: Sequence[Example],
    encoder: FrozenImageEncoder,
    bad: BadInputLog,
    views: int = 0,
    cache: FeatureCache | None = None,
    desc: str = "features",
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> CacheFill:
    """Make sure the cache holds each example's image (plus `views` augmented renderings),
    encoding only what is missing; reads no features back. Unreadable images are counted in
    `bad`. `progress(n)` replaces the progress bar (n = (image, view) pairs done)."""
    if cache is None:  # (an empty cache is falsy: it has a length)
        cache = FeatureCache(subdir("features"), encoder.encoder_id)
    digests: list[str | None] = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        for example, digest in zip(
            examples, pool.map(_safe_digest, [e.image for e in examples]), strict=False
        ):
            if digest is None:
                bad.add("unreadable image", f"{example.image}: cannot read file")
            digests.append(digest)
    kept = [i for i, d in enumerate(digests) if d is not None]
    keys = [[f"{digests[i]}:{v}" for i in kept] for v in range(views + 1)]
    todo = [(v, j) for v in range(views + 1) for j, key in enumerate(keys[v]) if key not in cache]
    broken: set[int] = set()
    encoded = 0
    if todo:
        bar = tqdm(total=len(todo), desc=desc, unit="img", leave=False, disable=progress is not None)
        for start in range(0, len(todo), 256):
            part = todo[start : start + 256]
            with ThreadPoolExecutor(max_workers=2) as pool:
                images = list(
                    pool.map(lambda vj: _render(examples[kept[vj[1]]], vj[0], digests[kept[vj[1]]]), part)
                )
            ok = [(vj, img) for vj, img in zip(part, images, strict=False) if not isinstance(img, str)]
            for vj, img in zip(part, images, strict=False):
                if isinstance(img, str) and vj[1] not in broken:
                    broken.add(vj[1])
                    bad.add("undecodable image", img)
            if ok:
                feats = torch.cat(
                    [
                        encoder.encode([img for _, img in ok[s : s + batch_size]])
                        for s in range(0, len(ok), batch_size)
                    ]
                )
                cache.put([keys[v][j] for (v, j), _ in ok], feats)
                encoded += len(ok)
            bar.update(len(part))
            if progress is not None:
                progress(len(part))
        bar.close()
    good = [j for j in range(len(kept)) if j not in broken]
    return CacheFill(
        [kept[j] for j in good],
        [[keys[v][j] for j in good] for v in range(views + 1)],
        encoded,
        len(kept) * (views + 1) - len(todo),
    )


def extract_features(
    examples: Sequence[Example],
    encoder: FrozenImageEncoder,
    bad: BadInputLog,
    views: int = 0,
    cache: FeatureCache | None = None,
    desc: str = "features",
    batch_size: int = 8,
) -> Split:
    """Encode each example's image (plus `views` augmented renderings) once, through the cache.
    Unreadable images are counted in `bad` and dropped from the returned split."""
    if cache is None:  # (an empty cache is falsy: it has a length)
        cache = FeatureCache(subdir("features"), encoder.encoder_id)
    fill = fill_cache(examples, encoder, bad, views, cache, desc, batch_size)
    table = torch.stack([cache.get(fill.keys[v]) for v in range(views + 1)])
    return Split([examples[i] for i in fill.kept], table)


def _safe_digest(path: str) -> str | None:
    try:
        return file_digest(path)
    except OSError:
        return None


def _render(example: Example, view: int, digest: str | None):
    """The image (or its restyled view), or the message saying why it cannot be decoded."""
    try:
        image = load_image(example.image)
    except ImageError as err:
        return str(err)
    if view == 0:
        return image
    return restyle(image, random.Random(f"{digest}:{view}"))
