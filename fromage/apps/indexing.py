"""`fromage index`: embed an image collection into a model's retrieval space (fromage/index/).

Sources: a folder tree of images, the published TSV (`caption<TAB>image`), JSONL
(`{"image", "caption"}`), webdataset tar shards (`data/{00000..00099}.tar`), or a built-in set
(`emoji-google`, `emoji-twitter`, `easyvqa-train`, `easyvqa-test`). Images whose content digest
is already in the index are skipped, so re-running on a grown collection only embeds what is new.
Frozen features go through the shared feature cache (parallel decoding, batched encoding,
progress bar).
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..checkpoint import checkpoint_digest
from ..config import MAX_BAD_FRACTION
from ..data.digest import file_digest
from ..data.examples import Example
from ..data.readers import BadInputLog
from ..data.sources import read_source
from ..index.jsonl_rows import JsonlRows, write_rows
from ..index.store import BadIndex, ImageIndex, pid_alive, recover

if TYPE_CHECKING:
    from ..model import FromageModel

BLOCK = 50_000
"""New images embedded per step by `fromage index`: RAM holds one block's frozen features
(50,000 × 1,280 floats = 256 MB for EfficientNet-Lite0), not the collection's."""


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


def index_collection(
    source: str,
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    image_dir: str | None = None,
    index_type: str = "auto",
    max_bad_fraction: float = MAX_BAD_FRACTION,
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
    _clear_dead_scratch(out_dir)
    if (out_dir / "manifest.json").exists():
        existing = ImageIndex.load(out_dir, checkpoint_digest=digest)
    bad = BadInputLog()
    examples = read_source(source, image_dir, bad)
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
        from ..model import FromageModel

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
        # New images are embedded BLOCK at a time into a scratch directory beside the index:
        # RAM holds one block's frozen features, whatever the collection's size, and the
        # index is then built or grown from the mapped rows (index/store.py streams them).
        scratch = out_dir.parent / f".{out_dir.name}.adding-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            added = _embed_in_blocks(todo, model, bad, scratch)
            bad.check(max(len(examples), 1), max_bad_fraction)
            if added == 0 and existing is None:
                raise ValueError(f"index source {source!r} holds no readable image")
            if added:
                shape = (added, model.config.retrieval_dim)
                embeddings = np.memmap(scratch / "rows.f32", np.float32, "r", shape=shape)
                metadata = JsonlRows(scratch / "metadata.jsonl")
                if existing is None:
                    index = ImageIndex.build(embeddings, metadata, encoder_id, digest, index_type)
                else:
                    index = existing.extend(
                        embeddings, metadata, None if index_type == "auto" else index_type
                    )
                index.save(out_dir)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
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


def _embed_in_blocks(
    todo: list[tuple[Example, str]], model: FromageModel, bad: BadInputLog, scratch: Path
) -> int:
    """Embed the images of `todo` BLOCK at a time, appending (n, d) float32 rows to
    `scratch/rows.f32` and their metadata lines to `scratch/metadata.jsonl`; returns the rows
    written (images that cannot be decoded are counted in `bad` and skipped)."""
    from ..data.dataset import extract_features
    from ..embed import embed_images

    assert model.encoder is not None
    written = 0
    blocks = max(1, -(-len(todo) // BLOCK))
    with open(scratch / "rows.f32", "wb") as rows, open(scratch / "metadata.jsonl", "wb") as meta:
        for b in range(blocks):
            block = todo[b * BLOCK : (b + 1) * BLOCK]
            desc = "index features" if blocks == 1 else f"index features {b + 1}/{blocks}"
            split = extract_features([e for e, _ in block], model.encoder, bad, desc=desc)
            if not split.examples:
                continue
            embeddings = embed_images(model, split.features[0]).numpy().astype("<f4")
            rows.write(embeddings.tobytes())
            digest_of = {e.image: d for e, d in block}
            write_rows(
                [
                    {"path": _absolute(e.image), "caption": e.caption, "digest": digest_of[e.image]}
                    for e in split.examples
                ],
                meta,
            )
            written += len(split.examples)
    return written


def _clear_dead_scratch(out_dir: Path) -> None:
    """Scratch directories of `fromage index` runs that were killed (their process is gone)."""
    for path in out_dir.parent.glob(f".{out_dir.name}.adding-*"):
        pid = path.name.rsplit("-", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _absolute(path: str) -> str:
    """The stored path, independent of the working directory (a tar reference keeps its member)."""
    shard, sep, member = path.partition("#") if ".tar#" in path else (path, "", "")
    return str(Path(shard).resolve()) + sep + member


def _safe_digest(path: str) -> str | None:
    try:
        return file_digest(path)
    except OSError:
        return None
