"""`fromage index`: embed an image collection into a model's retrieval space (index.py).

Sources: a folder tree of images, the published TSV (`caption<TAB>image`), JSONL
(`{"image", "caption"}`), or a built-in set (`emoji-google`, `emoji-twitter`, `easyvqa-train`,
`easyvqa-test`). Images whose content digest is already in the index are skipped, so re-running
on a grown collection only embeds what is new. Frozen features go through the shared feature
cache (parallel decoding, batched encoding, progress bar).
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.builtin import easyvqa_examples, emoji_examples
from .data.dataset import extract_features
from .data.examples import Example
from .data.features import file_digest
from .data.readers import BadInputLog, read_collection
from .index import ImageIndex
from .model import FromageModel
from .validation import embed_images

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
BUILTIN = ("emoji-google", "emoji-twitter", "easyvqa-train", "easyvqa-test")


@dataclass
class IndexReport:
    directory: Path
    total: int
    added: int
    skipped: int
    bad: str
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.added / max(self.seconds, 1e-9)


def list_source(source: str, image_dir: str | None, bad: BadInputLog) -> list[Example]:
    """Every image a source names, with its caption when the source has one."""
    if source in BUILTIN:
        kind, variant = source.split("-", 1)
        if kind == "emoji":
            return emoji_examples(variant, "all")
        return easyvqa_examples(variant)
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return [Example(str(p), "", "folder") for p in files]
    if path.is_file():
        return read_collection(path, image_dir, bad)
    raise FileNotFoundError(
        f"index source {source!r} is not a folder, a .tsv/.jsonl file, or one of {', '.join(BUILTIN)}"
    )


def checkpoint_digest(checkpoint_dir: str | Path) -> str:
    """SHA-256 of the checkpoint's trained tensors file: an index belongs to these weights."""
    h = hashlib.sha256()
    with open(Path(checkpoint_dir) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def index_collection(
    source: str,
    model: FromageModel,
    digest: str,
    out_dir: str | Path,
    image_dir: str | None = None,
    index_type: str = "auto",
    max_bad_fraction: float = 0.01,
) -> IndexReport:
    """Build `out_dir`, or grow it with the images of `source` it does not hold yet."""
    if model.encoder is None:
        raise ValueError("indexing needs the model's image encoder (load it with load_encoder=True)")
    start = time.time()
    out_dir = Path(out_dir)
    encoder_id = model.encoder.encoder_id
    existing = None
    if (out_dir / "manifest.json").exists():
        existing = ImageIndex.load(out_dir, encoder_id, digest, model.config.retrieval_dim)
    bad = BadInputLog()
    examples = list_source(source, image_dir, bad)
    with ThreadPoolExecutor(max_workers=4) as pool:
        digests = list(pool.map(_safe_digest, [e.image for e in examples]))
    known = existing.digests if existing is not None else set()
    todo: list[tuple[Example, str]] = []
    for example, d in zip(examples, digests, strict=True):
        if d is None:
            bad.add("unreadable image", f"{example.image}: cannot read file")
        elif d not in known:
            known.add(d)  # the same picture twice in one source is indexed once
            todo.append((example, d))
    bad.check(max(len(examples), 1), max_bad_fraction)
    added = 0
    index = existing
    if todo:
        split = extract_features([e for e, _ in todo], model.encoder, bad, desc="index features")
        bad.check(max(len(examples), 1), max_bad_fraction)
        embeddings = embed_images(model, split.features[0]).numpy().astype(np.float32)
        digest_of = {e.image: d for e, d in todo}
        metadata = [
            {"path": e.image, "caption": e.caption, "digest": digest_of[e.image]} for e in split.examples
        ]
        if existing is None:
            index = ImageIndex.build(embeddings, metadata, encoder_id, digest, index_type)
        else:
            index = existing.extend(embeddings, metadata, None if index_type == "auto" else index_type)
        index.save(out_dir)
        added = len(metadata)
    elif existing is None:
        raise ValueError(f"index source {source!r} holds no readable image")
    assert index is not None
    return IndexReport(
        out_dir, len(index), added, len(examples) - len(todo), bad.summary(), time.time() - start
    )


def _safe_digest(path: str) -> str | None:
    try:
        return file_digest(path)
    except OSError:
        return None
