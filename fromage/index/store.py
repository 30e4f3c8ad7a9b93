"""An image collection embedded in the retrieval space, searchable with FAISS.

An index directory holds:

| file | what |
|---|---|
| `manifest.json` | format version, encoder id, checkpoint digest, dimension, count, index type, and the byte size and SHA-256 of every other file |
| `embeddings.npy` | (N, D) float32 unit vectors, memory-mappable |
| `metadata.jsonl` | one `{"path", "caption", "digest"}` line per row (memory-mapped on load and parsed a row at a time, see `jsonl_rows.py`) |
| `index.faiss` | FAISS inner-product index over the same rows (exact `flat`, or `hnsw` / `ivf` / `ivfpq`) |

Writes go to a temporary sibling directory that replaces the old one only when complete, so
an interrupted build never leaves a half-written index. Loading checks every file's size
against the manifest before FAISS reads anything (and its SHA-256 too, for files up to
`HASH_LIMIT` bytes or when asked), and refuses an index built for another model.
Nothing here is unpickled: numpy files load with `allow_pickle=False`.

FAISS itself (building each index type, searching, exact re-scoring, recall) is search.py's;
this file is the store: the format, atomic writes, recovery of a killed writer, loading with
its checks, growing. It is over 400 lines because those share the manifest and the directory
protocol, and splitting them would spread one protocol over several files.

Large collections (docs/scale.md, "Large indexes"): `ivfpq` trains on a sample and adds rows
in chunks, so a memory-mapped `embeddings.npy` of any length builds in bounded memory; its
compressed (PQ) scores pick candidates that are re-scored exactly against the float32 rows.
Every approximate index measures its recall@10 against exact search at build time and keeps
it in the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import sha256_file
from . import search as ann
from .jsonl_rows import ChainedRows, JsonlRows, row_of_digest, write_rows
from .row_blocks import RowBlocks
from .search import ADD_CHUNK, RECALL_K, RECALL_QUERIES, Rows

FORMAT_VERSION = 2
"""2 added `params` and `recall` to the manifest (and the `ivfpq` type); version 1 still loads."""

READABLE_VERSIONS = (1, 2)

FILES = ("embeddings.npy", "metadata.jsonl", "index.faiss")

HASH_LIMIT = 256 << 20
"""Files up to this many bytes are hashed on every load; larger ones only with `verify=True`
(hashing 10 GB of embeddings would take a minute per load). Sizes are always checked."""

MMAP_LIMIT = 256 << 20
"""`load(mmap=None)` memory-maps an `index.faiss` larger than this."""


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
    params: dict[str, int] = field(default_factory=dict)
    """FAISS build settings (`nlist`, `pq_bytes`, `train_rows`, and `trained_for`: the rows there
    were when the lists were trained) and search settings (`nprobe`;
    `rerank`: candidates re-scored exactly per wanted result, 0 = none)."""
    chosen: list[str] | None = None
    """The `params` given at build rather than derived (a growing index rebuilt keeps its given
    code size and re-ranking depth); None in manifests written before this was recorded, whose
    settings are all derived anew."""
    recall: dict[str, float] | None = None
    """`{"k", "queries", "recall"}`: recall@k against exact search, measured at build on
    indexed rows used as queries (each query's own row left out of both lists). None for
    an exact (`flat`) index."""


def _leftovers(directory: Path) -> list[tuple[str, int, Path]]:
    """(kind, writer pid, path) of the temporaries `save` leaves beside `directory` while it
    runs: `.NAME.tmp-PID` (the new version) and `.NAME.old-PID` (the version it replaces)."""
    out = []
    for path in directory.parent.glob(f".{directory.name}.*-*"):
        kind, _, pid = path.name[len(directory.name) + 2 :].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and path.is_dir():
            out.append((kind, int(pid), path))
    return out


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _live_writers(directory: Path) -> bool:
    return any(pid_alive(pid) for _, pid, _ in _leftovers(directory))


def recover(directory: str | Path) -> bool:
    """Repair what a writer killed inside `save` left, and say whether an index is in place.

    `save` renames the current index to `.NAME.old-PID`, then its complete new version
    `.NAME.tmp-PID` to NAME; killed between the two, it leaves no NAME. Of a dead writer's
    temporaries, the new version is put in place when it is complete (it checks against its
    manifest), else the old one; the rest is deleted. Live writers' temporaries are left
    alone (their rename is microseconds away)."""
    directory = Path(directory)
    dead = [(kind, path) for kind, pid, path in _leftovers(directory) if not pid_alive(pid)]
    if not directory.exists():
        # Newest version first: a complete `tmp` is newer than any `old`.
        for _, path in sorted(dead, key=lambda kp: (kp[0] != "tmp", -kp[1].stat().st_mtime)):
            try:
                ImageIndex._load_once(path, None, None, None, True, None)
                os.replace(path, directory)
                break
            except (BadIndex, OSError, ValueError, RuntimeError):
                continue  # incomplete, or another process restored one first
    for _, path in dead:
        shutil.rmtree(path, ignore_errors=True)
    return directory.exists()


class ImageIndex:
    """A loaded (or freshly built) index: `search` returns scores and row numbers; `metadata[i]`
    describes row i (a list when built here, `JsonlRows` read from the file when loaded)."""

    def __init__(self, manifest: Manifest, embeddings: Rows, metadata: Sequence[dict], faiss_index: Any):
        self.manifest = manifest
        self.embeddings = embeddings
        self.metadata = metadata
        self.faiss_index = faiss_index

    def __len__(self) -> int:
        return self.manifest.count

    def row_of_digest(self, digest: str) -> int | None:
        """The first row holding the image with this digest (`data.digest.file_digest`), or None."""
        return row_of_digest(self.metadata, digest)

    # ------------------------------------------------------------------ build / save

    @classmethod
    def build(
        cls,
        embeddings: Rows,
        metadata: Sequence[dict],
        encoder_id: str,
        checkpoint_digest: str,
        index_type: str = "auto",
        options: dict[str, int] | None = None,
    ) -> ImageIndex:
        """Index these rows. `embeddings` may be a read-only memmap of an `.npy` file: it is
        read in chunks, never copied whole (see `build_faiss`; `options` are its keyword
        settings for `ivfpq`). An approximate index measures its recall here (`recall`)."""
        if not isinstance(embeddings, RowBlocks):
            embeddings = np.asarray(embeddings)  # a memmap stays a view of its file
            if embeddings.ndim != 2:
                raise ValueError(f"embeddings must be (N, D), got shape {embeddings.shape}")
            if embeddings.dtype != np.float32 or not embeddings.flags.c_contiguous:
                embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if len(metadata) != embeddings.shape[0]:
            raise ValueError(f"{embeddings.shape[0]} embeddings but {len(metadata)} metadata rows")
        index, resolved, params = ann.build_faiss(embeddings, index_type, **(options or {}))
        manifest = Manifest(
            encoder_id,
            checkpoint_digest,
            int(embeddings.shape[1]),
            len(metadata),
            resolved,
            params=params,
            chosen=sorted(options or {}),
        )
        # Rows of a file (parsed when read) are kept as they are: no 10M dicts in RAM.
        rows = metadata if isinstance(metadata, (JsonlRows, ChainedRows)) else list(metadata)
        built = cls(manifest, embeddings, rows, index)
        if resolved != "flat" and len(metadata) > 1:
            built.manifest.recall = built.measure_recall()
        return built

    def measure_recall(
        self, queries: int = RECALL_QUERIES, k: int = RECALL_K, seed: int = 1
    ) -> dict[str, float]:
        """Recall@k of `search` against exact search, on `queries` indexed rows drawn at random
        (each query's own row left out, see `measure_recall`)."""
        n = len(self)
        rows = np.sort(np.random.default_rng(seed).choice(n, min(queries, n), replace=False))
        k = min(k, n - 1)
        recall = ann.measure_recall(self.search, self.embeddings, np.asarray(self.embeddings[rows]), k, rows)
        return {"k": k, "queries": len(rows), "recall": round(recall, 4)}

    def extend(
        self, embeddings: np.ndarray, metadata: Sequence[dict], index_type: str | None = None
    ) -> ImageIndex:
        """A new index with these rows appended; this one is left as it was.

        Nothing already indexed is copied: the rows become `RowBlocks` (the saved matrix, then
        the new rows) and the metadata `ChainedRows`; `save` streams both to disk. The new
        rows are added to a copy of the FAISS index (the loaded one may be memory-mapped,
        read-only), so growing an index of millions costs its compressed codes in RAM, not its
        float32 rows. The index is rebuilt over all rows instead when the type changes (given,
        or `auto` outgrowing `flat`), or when an `ivf`/`ivfpq` index would hold more than
        twice the rows its lists were trained for (new images far from the old centroids would
        crowd a few lists). Recall is measured again either way."""
        dim = self.manifest.dim
        if (
            isinstance(embeddings, np.memmap)
            and not embeddings.flags.writeable
            and embeddings.dtype == np.float32
        ):
            new = embeddings  # a read-only file mapping (`fromage index`'s new rows): kept, not loaded
        else:
            new = np.array(embeddings, dtype=np.float32, copy=True)  # the caller may reuse its buffer
        if len(new) and new.shape[1:] != (dim,):
            raise ValueError(f"new embeddings have shape {new.shape}, the index holds rows of dim {dim}")
        if len(new) != len(metadata):
            raise ValueError(f"{len(new)} new embeddings but {len(metadata)} metadata rows")
        new = new.reshape(-1, dim)
        rows = RowBlocks([self.embeddings, new])
        meta = ChainedRows([self.metadata, list(metadata)])
        total = len(self) + len(new)
        current = self.manifest.index_type
        wanted = ann.resolve_type(index_type or ("auto" if current == "flat" else current), total)
        trained_for = int(self.manifest.params.get("trained_for", len(self)))
        if wanted != current or (current in ("ivf", "ivfpq") and total > 2 * trained_for):
            # Settings derived from the size are derived anew; a code size or re-ranking depth
            # that an ivfpq index was given at build is kept.
            options = {}
            if wanted == current == "ivfpq":
                given = set(self.manifest.chosen or ()) & {"pq_bytes", "rerank"}
                options = {name: int(self.manifest.params[name]) for name in sorted(given)}
            return ImageIndex.build(
                rows, meta, self.manifest.encoder_id, self.manifest.checkpoint_digest, wanted, options or None
            )
        faiss = ann.load_faiss()
        grown = faiss.deserialize_index(faiss.serialize_index(self.faiss_index))  # (a copy in RAM)
        for start in range(0, len(new), ADD_CHUNK):
            grown.add(np.ascontiguousarray(new[start : start + ADD_CHUNK]))
        manifest = Manifest(
            self.manifest.encoder_id,
            self.manifest.checkpoint_digest,
            dim,
            total,
            current,
            params=dict(self.manifest.params),
            chosen=self.manifest.chosen,
        )
        extended = ImageIndex(manifest, rows, meta, grown)
        if current != "flat" and total > 1:
            extended.manifest.recall = extended.measure_recall()
        return extended

    def save(self, directory: str | Path) -> Path:
        """Write atomically: a complete temporary directory replaces `directory`. Every file's
        SHA-256 is computed here, once; `load` re-checks it (always for small files).
        A writer killed between its two renames is repaired by `recover`."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        recover(directory)
        tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_rows(tmp / "embeddings.npy", self.embeddings)
        with open(tmp / "metadata.jsonl", "wb") as f:
            write_rows(self.metadata, f)
        ann.load_faiss().write_index(self.faiss_index, str(tmp / "index.faiss"))
        self.manifest.files = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in FILES
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
        verify: bool | None = None,
        mmap: bool | None = None,
        attempts: int = 30,
    ) -> ImageIndex:
        """Open an index, checking every file against the manifest first, then (when given)
        that it was built with this encoder, checkpoint and dimension.

        Sizes are always checked; SHA-256 hashes of files up to `HASH_LIMIT` bytes are checked
        by default (`verify=None`), of every file with `verify=True`, of none with False.
        `embeddings.npy` is always memory-mapped; `index.faiss` is too with `mmap=True`, or
        by default (`mmap=None`) when larger than `MMAP_LIMIT` bytes, so opening an index of
        millions costs page cache, not RAM.

        A writer replaces the whole directory (`save`), so a load that overlaps a save can
        see the directory missing, or files of two versions. Such a load is detected (the
        directory's identity changed, or it vanished) and retried: a reader gets the old or the
        new index, never a torn one. A fault in an unchanging directory raises at once."""
        directory = Path(directory)
        for attempt in range(attempts):
            if not directory.exists() and not recover(directory) and not _live_writers(directory):
                raise BadIndex(f"{directory}: no image index there (build one with `fromage index`)")
            before = _identity(directory)
            try:
                index = cls._load_once(directory, encoder_id, checkpoint_digest, dim, verify, mmap)
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
        verify: bool | None,
        mmap: bool | None,
    ) -> ImageIndex:
        manifest_path = directory / "manifest.json"
        if not manifest_path.is_file():
            raise BadIndex(f"{directory}: not an image index (no manifest.json)")
        try:
            raw = json.loads(manifest_path.read_text())
            manifest = Manifest(**raw)
        except (json.JSONDecodeError, TypeError) as exc:
            raise BadIndex(f"{manifest_path}: unreadable manifest ({exc})") from None
        if manifest.format_version not in READABLE_VERSIONS:
            raise BadIndex(
                f"{directory}: index format {manifest.format_version}, this version reads "
                f"{' or '.join(map(str, READABLE_VERSIONS))} (rebuild the index)"
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
            if (verify or (verify is None and size <= HASH_LIMIT)) and sha256_file(path) != expected[
                "sha256"
            ]:
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
        metadata = JsonlRows(directory / "metadata.jsonl")  # parsed row by row, when read
        if verify:  # asked for every check: parse every row now, not when it is first read
            try:
                for _ in metadata:
                    pass
            except ValueError as error:
                raise BadIndex(str(error)) from None
        if len(metadata) != manifest.count:
            raise BadIndex(f"{directory}: {len(metadata)} metadata rows, manifest says {manifest.count}")
        faiss = ann.load_faiss()
        faiss_path = directory / "index.faiss"
        # IO_FLAG_MMAP_IFC maps the flat codes / inverted lists of every type we build (checked
        # with RSS before and after reading, faiss 1.15); plain IO_FLAG_MMAP fails on flat ones.
        use_mmap = mmap if mmap is not None else faiss_path.stat().st_size > MMAP_LIMIT
        faiss_index = faiss.read_index(str(faiss_path), faiss.IO_FLAG_MMAP_IFC if use_mmap else 0)
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
        rerank = int(self.manifest.params.get("rerank", 0))
        scores, ids = ann.approximate_search(self.faiss_index, self.embeddings, queries, want, rerank)
        out_s = np.full((len(queries), k), -np.inf, np.float32)
        out_i = np.full((len(queries), k), -1, np.int64)
        for q in range(len(queries)):
            kept = [
                (s, i) for s, i in zip(scores[q], ids[q], strict=True) if i >= 0 and int(i) not in exclude
            ][:k]
            for j, (s, i) in enumerate(kept):
                out_s[q, j], out_i[q, j] = s, i
        return out_s, out_i


def _write_rows(path: Path, rows: np.ndarray | RowBlocks) -> None:
    """(N, D) float32 rows to an `.npy` file, `ADD_CHUNK` rows at a time: a memmap or
    `RowBlocks` of any length is written without being loaded whole. Plain writes, not a
    writable memmap, so that a full disk raises OSError (through a mapping it is SIGBUS)."""
    n, dim = rows.shape
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
        "fortran_order": False,
        "shape": (n, dim),
    }
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, n, ADD_CHUNK):
            f.write(np.ascontiguousarray(rows[start : start + ADD_CHUNK], dtype="<f4").tobytes())


def _identity(directory: Path) -> tuple[int, int, bytes] | None:
    """What tells two saved versions apart: the directory's inode (a save swaps in a new
    directory) and its manifest's bytes (inodes are reused quickly; manifests of different
    versions differ). None while the directory is missing (mid-replace)."""
    try:
        st = os.stat(directory)
        return st.st_dev, st.st_ino, (directory / "manifest.json").read_bytes()
    except FileNotFoundError:
        return None
