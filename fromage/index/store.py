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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from ..fileio import sha256_file
from .jsonl_rows import ChainedRows, JsonlRows, row_of_digest, write_rows
from .row_blocks import RowBlocks

FORMAT_VERSION = 2
"""2 added `params` and `recall` to the manifest (and the `ivfpq` type); version 1 still loads."""
READABLE_VERSIONS = (1, 2)
EXACT_LIMIT = 100_000
"""`index_type="auto"` builds an exact index up to this many images, HNSW above..."""
HNSW_LIMIT = 1_000_000
"""...and IVF-PQ above this many (HNSW keeps every float32 row in RAM and builds slowly)."""
FILES = ("embeddings.npy", "metadata.jsonl", "index.faiss")
HASH_LIMIT = 256 << 20
"""Files up to this many bytes are hashed on every load; larger ones only with `verify=True`
(hashing 10 GB of embeddings would take a minute per load). Sizes are always checked."""
MMAP_LIMIT = 256 << 20
"""`load(mmap=None)` memory-maps an `index.faiss` larger than this."""
ADD_CHUNK = 65_536
"""Rows handed to FAISS per `add` call when building from a (memory-mapped) matrix."""
EXACT_CHUNK = 8_192
"""Rows per step of `exact_search`: 1,000 recall queries then need ~130 MB of temporaries
(65,536 rows took ~1.4 GB), and the (Q, D) @ (D, chunk) product is still large enough for BLAS."""
RECALL_QUERIES = 1_000
RECALL_K = 10
Rows: TypeAlias = np.ndarray | RowBlocks
"""(N, D) float32 rows: an array, a read-only memmap, or the blocks of a grown index."""
SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


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
    recall: dict[str, float] | None = None
    """`{"k", "queries", "recall"}`: recall@k against exact search, measured at build on
    indexed rows used as queries (each query's own row left out of both lists). None for
    an exact (`flat`) index."""


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss is a core dependency
        raise ImportError("image indexes need faiss: pip install faiss-cpu") from exc
    return faiss


def build_faiss(
    embeddings: Rows,
    index_type: str = "auto",
    *,
    nlist: int | None = None,
    pq_bytes: int | None = None,
    nprobe: int | None = None,
    train_rows: int | None = None,
    rerank: int | None = None,
    chunk_rows: int = ADD_CHUNK,
    seed: int = 0,
) -> tuple[Any, str, dict[str, int]]:
    """(N, D) float32 unit vectors (an array or a read-only memmap) → (FAISS inner-product
    index, resolved type, settings for the manifest). `ivfpq` trains on `train_rows` sampled
    rows and every type but `hnsw` is fed `chunk_rows` rows at a time, so building from a
    memmap copies only the sample and one chunk into RAM. The keyword settings apply to
    `ivfpq` only (None = a default derived from N and D, see `_ivfpq`)."""
    faiss = _faiss()
    n, dim = embeddings.shape
    index_type = resolve_type(index_type, n)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    given = {
        k: v
        for k, v in dict(
            nlist=nlist, pq_bytes=pq_bytes, nprobe=nprobe, train_rows=train_rows, rerank=rerank
        ).items()
        if v is not None
    }
    if given and index_type != "ivfpq":
        raise ValueError(f"{', '.join(given)} only apply to index_type 'ivfpq', not {index_type!r}")
    params: dict[str, int] = {}
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
        index.train(np.ascontiguousarray(embeddings, dtype=np.float32))
        index.nprobe = min(lists, max(16, lists // 16))
        params = {"nlist": lists, "nprobe": int(index.nprobe), "trained_for": n}
    elif index_type == "ivfpq":
        index, params = _ivfpq(embeddings, nlist, pq_bytes, nprobe, train_rows, rerank, seed)
    else:
        raise ValueError(f"index_type must be auto, flat, hnsw, ivf or ivfpq; got {index_type!r}")
    if n and index_type == "hnsw":
        index.add(np.ascontiguousarray(embeddings, dtype=np.float32))  # HNSW holds every row in RAM anyway
    elif n:
        for start in range(0, n, chunk_rows):
            index.add(np.ascontiguousarray(embeddings[start : start + chunk_rows], dtype=np.float32))
    return index, index_type, params


def resolve_type(index_type: str, n: int) -> str:
    """`auto` → the type built for `n` rows; any other name is returned as is."""
    if index_type != "auto":
        return index_type
    return "flat" if n <= EXACT_LIMIT else "hnsw" if n <= HNSW_LIMIT else "ivfpq"


def _ivfpq(
    embeddings: Rows,
    nlist: int | None,
    pq_bytes: int | None,
    nprobe: int | None,
    train_rows: int | None,
    rerank: int | None,
    seed: int,
) -> tuple[Any, dict[str, int]]:
    """An untrained-then-trained, empty IVF-PQ index and its settings.

    Defaults, measured on 1M × 256 clustered vectors on 2 cores (BENCHMARKS.md): ~sqrt(N)
    lists, because assigning every row to a list (N·nlist·D flops) dominates the build;
    D/4 one-byte PQ codes (64 bytes for 256-d) ranks well enough that re-scoring 10× the
    wanted results exactly reaches recall@10 ≈ 0.97; above 2M rows 20× (at 10M, 10× gave
    0.91 and 20× 0.97 at the same queries/s: more codes per list compete); the k-means runs
    on 32 rows per list (at least 10,240 so that PQ's 256 centroids get 40 points each),
    10 iterations."""
    faiss = _faiss()
    n, dim = embeddings.shape
    nlist = nlist if nlist is not None else max(1, min(65536, int(np.sqrt(n)), n // 39))
    pq_bytes = pq_bytes if pq_bytes is not None else _default_pq_bytes(dim)
    train_rows = train_rows if train_rows is not None else min(n, max(32 * nlist, 256 * 40))
    nprobe = nprobe if nprobe is not None else min(nlist, max(8, nlist // 64))
    rerank = rerank if rerank is not None else _default_rerank(n)
    if not 1 <= nlist <= n:
        raise ValueError(f"ivfpq needs 1 <= nlist <= rows; got nlist {nlist} for {n} rows")
    if pq_bytes < 1 or dim % pq_bytes:
        raise ValueError(f"pq_bytes must divide the dimension {dim}; got {pq_bytes}")
    if not max(nlist, 256) <= train_rows <= n:
        raise ValueError(
            f"ivfpq trains on between max(nlist, 256) = {max(nlist, 256)} and all {n} rows; "
            f"got train_rows {train_rows}"
        )
    if not 1 <= nprobe <= nlist:
        raise ValueError(f"nprobe must be between 1 and nlist ({nlist}); got {nprobe}")
    if rerank < 0:
        raise ValueError(f"rerank must be >= 0 (0 = no exact re-scoring); got {rerank}")
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, pq_bytes, 8, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    index.pq.cp.niter = 10
    index.pq.cp.max_points_per_centroid = 64
    # Sorted rows: a memmap is read front to back. (train_rows, D) is the only big copy.
    rows = np.sort(np.random.default_rng(seed).choice(n, train_rows, replace=False))
    with _blas_distances(faiss):
        index.train(np.ascontiguousarray(embeddings[rows], dtype=np.float32))
    index.nprobe = nprobe
    return index, {
        "nlist": nlist,
        "pq_bytes": pq_bytes,
        "train_rows": train_rows,
        "nprobe": nprobe,
        "rerank": rerank,
        "trained_for": n,
    }


def _default_rerank(n: int) -> int:
    """Candidates re-scored exactly per wanted result (see `_ivfpq`)."""
    return 10 if n <= 2_000_000 else 20


def _default_pq_bytes(dim: int) -> int:
    """The largest code size <= D/4 bytes that divides D (PQ splits D into equal sub-vectors)."""
    return next(m for m in range(max(1, dim // 4), 0, -1) if dim % m == 0)


@contextmanager
def _blas_distances(faiss: Any) -> Iterator[None]:
    """FAISS's k-means computes distances without BLAS below 128k points; on 4-d PQ sub-vectors
    that path was 3-4× slower here (IVF-PQ training at 1M × 256: ~83 s → ~20 s on a busy
    2-core machine). The threshold is a process-wide FAISS global: set only while training."""
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 20
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


def approximate_search(
    faiss_index: Any, embeddings: Rows, queries: np.ndarray, k: int, rerank: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(Q, D) float32 queries → (Q, k) scores and ids from FAISS, best first (-1 = none).
    With `rerank` > 0, FAISS proposes `rerank * k` candidates that are re-scored exactly
    against `embeddings` (a memmap is fine: only candidate rows are read), so the scores
    returned are exact inner products."""
    n = int(faiss_index.ntotal)
    if not rerank:
        scores, ids = faiss_index.search(queries, min(k, n))
        return scores, ids.astype(np.int64)
    _, candidates = faiss_index.search(queries, min(n, k * rerank))  # (Q, R)
    return rescore(embeddings, queries, candidates.astype(np.int64), k)


def rescore(
    embeddings: Rows, queries: np.ndarray, candidates: np.ndarray, k: int, block: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Exact re-ranking: (Q, D) queries and (Q, R) candidate rows (-1 = none) → the k best
    (Q, k) scores and rows by exact inner product, best first; ties keep candidate order."""
    q_n, r = candidates.shape
    keep = min(k, r)
    out_s = np.full((q_n, keep), -np.inf, np.float32)
    out_i = np.full((q_n, keep), -1, np.int64)
    # Blocks of queries keep the gathered rows small: (block, R, D) floats, ~3 MB at R=100, D=256.
    for start in range(0, q_n, block):
        cand = candidates[start : start + block]  # (B, R)
        rows = np.asarray(embeddings[np.maximum(cand, 0).ravel()], np.float32).reshape(*cand.shape, -1)
        scores = np.matmul(rows, queries[start : start + block, :, None])[..., 0]  # (B, R)
        scores[cand < 0] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
        out_s[start : start + block] = np.take_along_axis(scores, order, 1)
        out_i[start : start + block] = np.take_along_axis(cand, order, 1)
    return out_s, out_i


def exact_search(
    embeddings: Rows, queries: np.ndarray, k: int, chunk_rows: int = EXACT_CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over row chunks (bounded memory for a memmap of any length): the same
    top-k as `brute_force_search` up to the order of tied scores. Peak temporary memory is
    ~16 bytes per (query, chunk row) pair: the scores and argpartition's int64 indices."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = embeddings.shape[0]
    keep = min(k, n)
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, n, chunk_rows):
        block = np.asarray(embeddings[start : start + chunk_rows], np.float32)
        scores = queries @ block.T  # (Q, chunk)
        if scores.shape[1] > keep:
            top = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
            scores = np.take_along_axis(scores, top, 1)
        else:
            top = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        all_s = np.concatenate([best_s, scores], 1)
        all_i = np.concatenate([best_i, top + start], 1)
        order = np.lexsort((all_i, -all_s), axis=-1)[:, :keep]  # score down, then id up (ties)
        best_s = np.take_along_axis(all_s, order, 1)
        best_i = np.take_along_axis(all_i, order, 1)
    return best_s, best_i


def measure_recall(
    search: SearchFn,
    embeddings: Rows,
    queries: np.ndarray,
    k: int = RECALL_K,
    query_rows: np.ndarray | None = None,
) -> float:
    """Mean over queries of |approximate top-k ∩ exact top-k| / k, exact search (chunked
    brute force over `embeddings`) being the reference. When the queries are indexed rows
    (`query_rows[q]` is query q's row), that row is left out of both lists: finding a
    query's own copy is free and would flatter the index."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    extra = 0 if query_rows is None else 1
    k = min(k, embeddings.shape[0] - extra)
    if k < 1 or not len(queries):
        raise ValueError(f"recall needs at least one query and k >= 1; got {len(queries)} queries, k {k}")
    _, got = search(queries, k + extra)
    _, want = exact_search(embeddings, queries, k + extra)
    hits = 0
    for q in range(len(queries)):
        own = -1 if query_rows is None else int(query_rows[q])
        g = [int(i) for i in got[q] if i >= 0 and i != own][:k]
        w = [int(i) for i in want[q] if i != own][:k]
        hits += len(set(g) & set(w))
    return hits / (k * len(queries))


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
        index, resolved, params = build_faiss(embeddings, index_type, **(options or {}))
        manifest = Manifest(
            encoder_id, checkpoint_digest, int(embeddings.shape[1]), len(metadata), resolved, params=params
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
        recall = measure_recall(self.search, self.embeddings, np.asarray(self.embeddings[rows]), k, rows)
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
        wanted = resolve_type(index_type or ("auto" if current == "flat" else current), total)
        trained_for = int(self.manifest.params.get("trained_for", len(self)))
        if wanted != current or (current in ("ivf", "ivfpq") and total > 2 * trained_for):
            # Settings derived from the size are derived anew; a code size or re-ranking depth
            # that an ivfpq index was given (not its default then) is kept.
            options = {}
            if wanted == current == "ivfpq":
                defaults = {"pq_bytes": _default_pq_bytes(dim), "rerank": _default_rerank(trained_for)}
                options = {
                    name: int(self.manifest.params[name])
                    for name, default in defaults.items()
                    if self.manifest.params.get(name, default) != default
                }
            return ImageIndex.build(
                rows, meta, self.manifest.encoder_id, self.manifest.checkpoint_digest, wanted, options or None
            )
        faiss = _faiss()
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
        _faiss().write_index(self.faiss_index, str(tmp / "index.faiss"))
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
        faiss = _faiss()
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
        scores, ids = approximate_search(self.faiss_index, self.embeddings, queries, want, rerank)
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
