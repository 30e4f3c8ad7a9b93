"""FAISS over the retrieval space: building an index of each type, searching it (with exact
re-scoring of approximate candidates), exact chunked search, and recall measured against it.

Pure functions over (N, D) float32 rows; the on-disk store and its recovery are store.py's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeAlias

import numpy as np

from .row_blocks import RowBlocks

EXACT_LIMIT = 100_000
"""`index_type="auto"` builds an exact index up to this many images, HNSW above..."""

HNSW_LIMIT = 1_000_000
"""...and IVF-PQ above this many (HNSW keeps every float32 row in RAM and builds slowly)."""

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


def load_faiss() -> Any:
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
    faiss = load_faiss()
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
    codes of D/4 bytes (64 for 256-d) made of 2-d sub-vectors with 4-bit codes, which FAISS
    scans with its fast-scan SIMD kernels (`IndexIVFPQFastScan`): at 1M rows ~3× the
    queries/s of one-byte codes of 4-d sub-vectors at the same bytes, and a 7 s build against
    27 s. Re-scoring 20× the wanted results exactly reaches recall@10 ≈ 0.99 (10× gave 0.945);
    above 2M rows 40× (more codes per list compete; one-byte codes needed twice the re-scoring
    at 10M rows than at 1M, not re-measured with 4-bit codes). The k-means runs on 32 rows per
    list (at least 10,240), 10 iterations."""
    faiss = load_faiss()
    n, dim = embeddings.shape
    nlist = nlist if nlist is not None else max(1, min(65536, int(np.sqrt(n)), n // 39))
    pq_bytes = pq_bytes if pq_bytes is not None else default_pq_bytes(dim)
    train_rows = train_rows if train_rows is not None else min(n, max(32 * nlist, 256 * 40))
    nprobe = nprobe if nprobe is not None else min(nlist, max(8, nlist // 64))
    rerank = rerank if rerank is not None else default_rerank(n)
    if not 1 <= nlist <= n:
        raise ValueError(f"ivfpq needs 1 <= nlist <= rows; got nlist {nlist} for {n} rows")
    if pq_bytes < 1 or dim % (2 * pq_bytes):
        raise ValueError(
            f"pq_bytes must be such that 2 × pq_bytes (4-bit sub-quantizers) divides the dimension {dim}; "
            f"got {pq_bytes}"
        )
    if not max(nlist, 256) <= train_rows <= n:
        raise ValueError(
            f"ivfpq trains on between max(nlist, 256) = {max(nlist, 256)} and all {n} rows; "
            f"got train_rows {train_rows}"
        )
    if not 1 <= nprobe <= nlist:
        raise ValueError(f"nprobe must be between 1 and nlist ({nlist}); got {nprobe}")
    if rerank < 0:
        raise ValueError(f"rerank must be >= 0 (0 = no exact re-scoring); got {rerank}")
    index = faiss.IndexIVFPQFastScan(
        faiss.IndexFlatIP(dim), dim, nlist, 2 * pq_bytes, 4, faiss.METRIC_INNER_PRODUCT
    )
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


def default_rerank(n: int) -> int:
    """Candidates re-scored exactly per wanted result (see `_ivfpq`)."""
    return 20 if n <= 2_000_000 else 40


def default_pq_bytes(dim: int) -> int:
    """The largest code size <= D/4 bytes whose 2 × bytes 4-bit sub-quantizers split D into
    equal sub-vectors."""
    return next((m for m in range(max(1, dim // 4), 0, -1) if dim % (2 * m) == 0), 0)


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
    (Q, k) scores and rows by exact inner product, best first; ties keep candidate order.

    Reading the candidate rows is random access to memory (1M × 256 rows, 200 candidates for
    each of 500 queries: ~40 ms of 100 MB gathered on one core), so blocks of queries run on
    a thread per core (numpy releases the GIL while it gathers and multiplies): ~2× on 2 cores."""
    q_n, r = candidates.shape
    keep = min(k, r)
    out_s = np.full((q_n, keep), -np.inf, np.float32)
    out_i = np.full((q_n, keep), -1, np.int64)

    # Blocks of queries keep the gathered rows small: (block, R, D) floats, ~3 MB at R=100, D=256.
    def one_block(start: int) -> None:
        cand = candidates[start : start + block]  # (B, R)
        rows = np.asarray(embeddings[np.maximum(cand, 0).ravel()], np.float32).reshape(*cand.shape, -1)
        scores = np.matmul(rows, queries[start : start + block, :, None])[..., 0]  # (B, R)
        scores[cand < 0] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
        out_s[start : start + block] = np.take_along_axis(scores, order, 1)
        out_i[start : start + block] = np.take_along_axis(cand, order, 1)

    starts = range(0, q_n, block)
    workers = min(len(starts), _cores())
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one_block, starts))
    else:
        for start in starts:
            one_block(start)
    return out_s, out_i


def _cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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


def brute_force_search(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The naive twin of `ImageIndex.search` on an exact index: full scores, stable top-k."""
    scores = np.asarray(queries, np.float32) @ np.asarray(embeddings, np.float32).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order
