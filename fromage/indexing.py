"""`fromage index`: embed an image collection into a model's retrieval space (index.py).

Sources: a folder tree of images, the published TSV (`caption<TAB>image`), JSONL
(`{"image", "caption"}`), webdataset tar shards (`data/{00000..00099}.tar`), or a built-in set
(`emoji-google`, `emoji-twitter`, `easyvqa-train`, `easyvqa-test`). Images whose content digest
is already in the index are skipped, so re-running on a grown collection only embeds what is new.
Frozen features go through the shared feature cache (parallel decoding, batched encoding,
progress bar).
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .data.builtin import easyvqa_examples, emoji_examples
from .data.digest import file_digest
from .data.examples import Example
from .data.readers import BadInputLog, read_collection
from .data.shards import is_shard_source, read_shards
from .index import BadIndex, ImageIndex, recover

if TYPE_CHECKING:
    from .model import FromageModel

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
    recall: dict[str, float] | None = None
    """Recall@k of an approximate index against exact search (index.Manifest.recall)."""

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
    if is_shard_source(source):  # webdataset shards: `data/{00000..00099}.tar`, `data/*.tar`
        return read_shards(source, bad)
    if path.is_file():
        return read_collection(path, image_dir, bad)
    raise FileNotFoundError(
        f"index source {source!r} is not a folder, a .tsv/.jsonl file, .tar shards, or one of "
        f"{', '.join(BUILTIN)}"
    )


def checkpoint_digest(checkpoint_dir: str | Path) -> str:
    """SHA-256 over the checkpoint's config and trained tensors: an index belongs to exactly
    this model (backbone names, dimensions and weights)."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):  # checkpoint.py's layout
        with open(Path(checkpoint_dir) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def index_collection(
    source: str,
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    image_dir: str | None = None,
    index_type: str = "auto",
    max_bad_fraction: float = 0.01,
    device: str = "cpu",
    model: FromageModel | None = None,
) -> IndexReport:
    """Build `out_dir`, or grow it with the images of `source` it does not hold yet. The model
    is loaded from `checkpoint_dir` (unless passed) only when there is something to embed."""
    start = time.time()
    out_dir = Path(out_dir)
    digest = checkpoint_digest(checkpoint_dir)
    existing = None
    recover(out_dir)  # a run killed mid-save leaves the old (or new) version to put back
    if (out_dir / "manifest.json").exists():
        existing = ImageIndex.load(out_dir, checkpoint_digest=digest)
    bad = BadInputLog()
    examples = list_source(source, image_dir, bad)
    with ThreadPoolExecutor(max_workers=4) as pool:
        digests = list(pool.map(_safe_digest, [e.image for e in examples]))
    # Already indexed: a lookup per image (the index's digest table), not a set of all N digests.
    indexed = existing.row_of_digest if existing is not None else lambda _digest: None
    known: set[str] = set()
    todo: list[tuple[Example, str]] = []
    for example, d in zip(examples, digests, strict=True):
        if d is None:
            bad.add("unreadable image", f"{example.image}: cannot read file")
        elif d not in known and indexed(d) is None:
            known.add(d)  # the same picture twice in one source is indexed once
            todo.append((example, d))
    bad.check(max(len(examples), 1), max_bad_fraction)
    added = 0
    index = existing
    if todo:
        # torch and the model load only when something is new (an up-to-date re-run takes ~1 s).
        from .data.dataset import extract_features
        from .model import FromageModel
        from .validation import embed_images

        model = model or FromageModel.from_pretrained(checkpoint_dir, device=device).eval()
        if model.encoder is None:
            raise ValueError("indexing needs the model's image encoder (load it with load_encoder=True)")
        encoder_id = model.encoder.encoder_id
        if existing is not None and (existing.manifest.encoder_id, existing.manifest.dim) != (
            encoder_id,
            model.config.retrieval_dim,
        ):
            raise BadIndex(
                f"{out_dir}: index built with encoder {existing.manifest.encoder_id!r} and dimension "
                f"{existing.manifest.dim}, this model has {encoder_id!r} and {model.config.retrieval_dim}"
            )
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
        out_dir,
        len(index),
        added,
        len(examples) - len(todo),
        bad.summary(),
        time.time() - start,
        index.manifest.recall,
    )


def _safe_digest(path: str) -> str | None:
    try:
        return file_digest(path)
    except OSError:
        return None
