"""An image collection embedded in the retrieval space, searchable with FAISS.

An index directory holds:

| file | what |
|---|---|
| `manifest.json` | format version, encoder id, checkpoint digest, dimension, count, index type, and the byte size and SHA-256 of every other file |
| `embeddings.npy` | (N, D) float32 unit vectors, memory-mappable |
| `metadata.jsonl` | one `{"path", "caption", "digest"}` line per row |
| `index.faiss` | FAISS inner-product index over the same rows (exact `flat`, or `hnsw` / `ivf`) |

Writes go to a temporary sibling directory that replaces the old one only when complete, so
an interrupted build never leaves a half-written index. Loading checks every file against
the manifest before FAISS reads anything, and refuses an index built for another model.
Nothing here is unpickled: numpy files load with `allow_pickle=False`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
EXACT_LIMIT = 100_000
"""`index_type="auto"` builds an exact index up to this many images, HNSW above."""
FILES = ("embeddings.npy", "metadata.jsonl", "index.faiss")


class BadIndex(ValueError):
    """An index directory is missing, damaged, or was built for another model."""


@dataclass
class Manifest:
    encoder_id: str
    checkpoint_digest: str
    dim: int
    count: int
    index_type: str
    format_version: int = FORMAT_VERSION
    files: dict[str, dict[str, Any]] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss is a core dependency
        raise ImportError("image indexes need faiss: pip install faiss-cpu") from exc
    return faiss


def build_faiss(embeddings: np.ndarray, index_type: str = "auto") -> tuple[Any, str]:
    """(N, D) float32 unit vectors → (FAISS inner-product index, resolved type)."""
    faiss = _faiss()
    n, dim = embeddings.shape
    if index_type == "auto":
        index_type = "flat" if n <= EXACT_LIMIT else "hnsw"
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 64
    elif index_type == "ivf":
        # ~sqrt(N) lists (FAISS wants >= 39 training points per list); probe at least 16.
        lists = max(1, min(65536, int(np.sqrt(max(n, 1)))))
        if n < lists:
            raise ValueError(f"an ivf index needs at least as many images as lists ({lists}), got {n}")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(embeddings)
        index.nprobe = min(lists, max(16, lists // 16))
    else:
        raise ValueError(f"index_type must be auto, flat, hnsw or ivf; got {index_type!r}")
    if n:
        index.add(embeddings)
    return index, index_type


class ImageIndex:
    """A loaded (or freshly built) index: `search` returns scores and row numbers; `metadata[i]`
    describes row i."""

    def __init__(self, manifest: Manifest, embeddings: np.ndarray, metadata: list[dict], faiss_index: Any):
        self.manifest = manifest
        self.embeddings = embeddings
        self.metadata = metadata
        self.faiss_index = faiss_index

    def __len__(self) -> int:
        return self.manifest.count

    @property
    def digests(self) -> set[str]:
        return {m["digest"] for m in self.metadata if m.get("digest")}

    # ------------------------------------------------------------------ build / save

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        metadata: list[dict],
        encoder_id: str,
        checkpoint_digest: str,
        index_type: str = "auto",
    ) -> ImageIndex:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (N, D), got shape {embeddings.shape}")
        if len(metadata) != embeddings.shape[0]:
            raise ValueError(f"{embeddings.shape[0]} embeddings but {len(metadata)} metadata rows")
        index, resolved = build_faiss(embeddings, index_type)
        manifest = Manifest(encoder_id, checkpoint_digest, int(embeddings.shape[1]), len(metadata), resolved)
        return cls(manifest, embeddings, list(metadata), index)

    def extend(
        self, embeddings: np.ndarray, metadata: list[dict], index_type: str | None = None
    ) -> ImageIndex:
        """A new index with these rows appended (the FAISS index is rebuilt over all rows)."""
        if embeddings.shape[1:] != (self.manifest.dim,) and len(embeddings):
            raise ValueError(f"new embeddings have dim {embeddings.shape[1]}, index has {self.manifest.dim}")
        rows = (
            np.concatenate([np.asarray(self.embeddings), embeddings.astype(np.float32)])
            if len(embeddings)
            else self.embeddings
        )
        return ImageIndex.build(
            np.asarray(rows),
            self.metadata + list(metadata),
            self.manifest.encoder_id,
            self.manifest.checkpoint_digest,
            index_type or ("auto" if self.manifest.index_type == "flat" else self.manifest.index_type),
        )

    def save(self, directory: str | Path) -> Path:
        """Write atomically: a complete temporary directory replaces `directory`."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        np.save(tmp / "embeddings.npy", np.asarray(self.embeddings, dtype=np.float32), allow_pickle=False)
        with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as f:
            for row in self.metadata:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        _faiss().write_index(self.faiss_index, str(tmp / "index.faiss"))
        self.manifest.files = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in FILES
        }
        (tmp / "manifest.json").write_text(json.dumps(asdict(self.manifest), indent=2) + "\n")
        old = directory.parent / f".{directory.name}.old-{os.getpid()}"
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old.exists():
            shutil.rmtree(old)
        return directory

    # ------------------------------------------------------------------ load

    @classmethod
    def load(
        cls,
        directory: str | Path,
        encoder_id: str | None = None,
        checkpoint_digest: str | None = None,
        dim: int | None = None,
        verify_hashes: bool = True,
        attempts: int = 30,
    ) -> ImageIndex:
        """Open an index, checking every file against the manifest first, then (when given)
        that it was built with this encoder, checkpoint and dimension.

        A writer replaces the whole directory (`save`), so a load that overlaps a save can
        see the directory missing, or files of two versions. Such a load is detected (the
        directory's identity changed, or it vanished) and retried: a reader gets the old or the
        new index, never a torn one. A fault in an unchanging directory raises at once."""
        directory = Path(directory)
        for attempt in range(attempts):
            before = _identity(directory)
            try:
                index = cls._load_once(directory, encoder_id, checkpoint_digest, dim, verify_hashes)
            except Exception:  # a torn read can fail anywhere (numpy, JSON, FAISS's reader)
                if before is not None and _identity(directory) == before:
                    raise  # nothing changed underneath: the fault is real
            else:
                if before is not None and _identity(directory) == before:
                    return index
            time.sleep(min(0.005 * 2**attempt, 0.25))
        raise BadIndex(f"{directory}: replaced while being read, {attempts} times in a row")

    @classmethod
    def _load_once(
        cls,
        directory: Path,
        encoder_id: str | None,
        checkpoint_digest: str | None,
        dim: int | None,
        verify_hashes: bool,
    ) -> ImageIndex:
        manifest_path = directory / "manifest.json"
        if not manifest_path.is_file():
            raise BadIndex(f"{directory}: not an image index (no manifest.json)")
        try:
            raw = json.loads(manifest_path.read_text())
            manifest = Manifest(**raw)
        except (json.JSONDecodeError, TypeError) as exc:
            raise BadIndex(f"{manifest_path}: unreadable manifest ({exc})") from None
        if manifest.format_version != FORMAT_VERSION:
            raise BadIndex(
                f"{directory}: index format {manifest.format_version}, this version reads {FORMAT_VERSION}"
            )
        for name in FILES:
            path = directory / name
            expected = manifest.files.get(name)
            if expected is None:
                raise BadIndex(f"{directory}: manifest does not list {name}")
            if not path.is_file():
                raise BadIndex(f"{directory}: {name} is missing")
            size = path.stat().st_size
            if size != expected["bytes"]:
                raise BadIndex(
                    f"{directory}: {name} has {size} bytes, the manifest says {expected['bytes']} "
                    "(truncated or replaced; rebuild the index)"
                )
            if verify_hashes and _sha256(path) != expected["sha256"]:
                raise BadIndex(f"{directory}: {name} does not match its checksum in the manifest")
        for label, want, have in (
            ("encoder", encoder_id, manifest.encoder_id),
            ("checkpoint", checkpoint_digest, manifest.checkpoint_digest),
            ("dimension", dim, manifest.dim),
        ):
            if want is not None and want != have:
                raise BadIndex(f"{directory}: index built with {label} {have!r}, this model has {want!r}")
        embeddings = np.load(directory / "embeddings.npy", mmap_mode="r", allow_pickle=False)
        if embeddings.shape != (manifest.count, manifest.dim):
            raise BadIndex(
                f"{directory}: embeddings are {embeddings.shape}, manifest says ({manifest.count}, {manifest.dim})"
            )
        lines = (directory / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
        metadata = [json.loads(line) for line in lines if line.strip()]
        if len(metadata) != manifest.count:
            raise BadIndex(f"{directory}: {len(metadata)} metadata rows, manifest says {manifest.count}")
        faiss_index = _faiss().read_index(str(directory / "index.faiss"))
        if faiss_index.ntotal != manifest.count:
            raise BadIndex(
                f"{directory}: FAISS holds {faiss_index.ntotal} rows, manifest says {manifest.count}"
            )
        return cls(manifest, embeddings, metadata, faiss_index)

    # ------------------------------------------------------------------ search

    def search(
        self, queries: np.ndarray, k: int, exclude: set[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) unit queries → (Q, k) scores and row ids, best first; rows in `exclude` (e.g.
        images already in the context) are never returned. Missing results are id -1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.manifest.dim:
            raise ValueError(f"queries must be (Q, {self.manifest.dim}), got {queries.shape}")
        exclude = exclude or set()
        want = min(len(self), k + len(exclude))
        if want == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, ids = self.faiss_index.search(queries, want)
        out_s = np.full((len(queries), k), -np.inf, np.float32)
        out_i = np.full((len(queries), k), -1, np.int64)
        for q in range(len(queries)):
            kept = [
                (s, i) for s, i in zip(scores[q], ids[q], strict=True) if i >= 0 and int(i) not in exclude
            ][:k]
            for j, (s, i) in enumerate(kept):
                out_s[q, j], out_i[q, j] = s, i
        return out_s, out_i


def brute_force_search(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The naive twin of `ImageIndex.search` on an exact index: full scores, stable top-k."""
    scores = np.asarray(queries, np.float32) @ np.asarray(embeddings, np.float32).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


def _identity(directory: Path) -> tuple[int, int, bytes] | None:
    """What tells two saved versions apart: the directory's inode (a save swaps in a new
    directory) and its manifest's bytes (inodes are reused quickly; manifests of different
    versions differ). None while the directory is missing (mid-replace)."""
    try:
        st = os.stat(directory)
        return st.st_dev, st.st_ino, (directory / "manifest.json").read_bytes()
    except FileNotFoundError:
        return None
