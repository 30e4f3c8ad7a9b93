"""Retrieval at 1M × 256: the IVF-PQ index (with exact re-ranking) vs brute force, one run (issue #6).

    .venv/bin/python bench/retrieval.py [--n 1000000] [--dim 256] [--queries 500] [--rounds 3]

Data: synthetic *clustered* unit vectors (a Gaussian mixture: `--clusters` centres drawn around
64 broader topics, a per-cluster spread, unequal cluster sizes), because real image embeddings
cluster and uniform random vectors are a worst case no ANN index handles well. They are
written in chunks to a memory-mapped `embeddings.npy`, exactly what `fromage index` keeps.
Queries are held-out draws from the same mixture (not in the index).

Contenders, all answering the same query batch for top-10, in interleaved rounds:
- the index: `index.build_faiss(..., "ivfpq")` built from the memmap with its defaults (FAISS
  fast-scan IVF-PQ, 4-bit codes), searched
  with `index.approximate_search` (PQ candidates re-scored exactly against the memmap), i.e.
  what `ImageIndex.search` runs;
- brute force with numpy (matmul over the whole matrix in RAM, argpartition) and with torch
  (matmul, topk), batches of 100 queries; the faster of the two is the baseline.
Reported: build time (train + add), peak memory during the build, recall@10 vs exact search,
queries/s of each contender (median over rounds) and the ratio to the best brute force.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch

from fromage.index.search import approximate_search, build_faiss, exact_search, measure_recall

K = 10


def clustered(path: Path, n: int, dim: int, clusters: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """n unit vectors of the mixture (the same mixture for every seed) written to `path` in chunks."""
    rng = np.random.default_rng(1234)
    topics = rng.standard_normal((64, dim)).astype(np.float32) / np.sqrt(dim)
    centres = topics[rng.integers(0, 64, clusters)] + 0.7 * rng.standard_normal((clusters, dim)).astype(
        np.float32
    ) / np.sqrt(dim)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.5, 1.0, clusters).astype(np.float32)  # noise norm ≈ spread
    weights = rng.dirichlet(np.full(clusters, 2.0))  # unequal cluster sizes
    draw = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        c = draw.choice(clusters, m, p=weights)
        x = centres[c] + spread[c, None] * draw.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


class PeakMemory:
    """Samples /proc/self/status every 20 ms: peak VmRSS (includes memmap pages read, which the
    kernel can drop) and peak RssAnon (the process's own allocations)."""

    def __init__(self) -> None:
        self.rss = self.anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        fields = dict(
            line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
        )
        self.rss = max(self.rss, int(fields["VmRSS"].split()[0]) << 10)
        self.anon = max(self.anon, int(fields["RssAnon"].split()[0]) << 10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.02)

    def __enter__(self) -> PeakMemory:
        self._sample()  # a phase shorter than one period still gets a figure
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def numpy_brute(matrix: np.ndarray, queries: np.ndarray) -> np.ndarray:
    out = np.empty((len(queries), K), np.int64)
    for s in range(0, len(queries), 100):
        scores = queries[s : s + 100] @ matrix.T  # (100, N)
        top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
        out[s : s + 100] = np.take_along_axis(top, order, 1)
    return out


def torch_brute(matrix: torch.Tensor, queries: np.ndarray) -> np.ndarray:
    q = torch.from_numpy(queries)
    with torch.inference_mode():
        return torch.cat(
            [torch.topk(q[s : s + 100] @ matrix.T, K).indices for s in range(0, len(q), 100)]
        ).numpy()


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / K for g, w in zip(got, want, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=4096)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        data = clustered(Path(tmp) / "embeddings.npy", args.n, args.dim, args.clusters, seed=1)
        queries = np.array(
            clustered(Path(tmp) / "queries.npy", args.queries, args.dim, args.clusters, seed=2)
        )
        print(
            f"data: {args.n:,} × {args.dim} clustered unit vectors ({args.clusters} clusters), "
            f"{args.queries} held-out queries; generated in {time.perf_counter() - t:.1f} s",
            flush=True,
        )

        with PeakMemory() as peak:
            t = time.perf_counter()
            index, _, params = build_faiss(data, "ivfpq")
            build_s = time.perf_counter() - t
        print(f"ivfpq build (train + add, from the memmap): {build_s:.1f} s; settings {params}")
        print(
            f"peak during build: RSS {peak.rss / 2**30:.2f} GiB (of which anonymous {peak.anon / 2**30:.2f} GiB; "
            f"the matrix itself is {data.nbytes / 2**30:.2f} GiB)",
            flush=True,
        )

        def search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            return approximate_search(index, data, q, k, params["rerank"])

        t = time.perf_counter()
        rows = np.sort(np.random.default_rng(1).choice(args.n, min(1000, args.n), replace=False))
        build_recall = measure_recall(search, data, np.asarray(data[rows]), K, rows)
        print(
            f"recall@10 as measured at build (1,000 indexed rows as queries, own row left out): "
            f"{build_recall:.4f} ({time.perf_counter() - t:.1f} s)",
            flush=True,
        )
        _, exact = exact_search(data, queries, K)
        raw = recall(index.search(queries, K)[1], exact)

        matrix = np.array(data)  # brute force gets the whole matrix in RAM
        tensor = torch.from_numpy(matrix)
        contenders: dict[str, Callable[[], np.ndarray]] = {
            "index": lambda: search(queries, K)[1],
            "numpy brute force": lambda: numpy_brute(matrix, queries),
            "torch brute force": lambda: torch_brute(tensor, queries),
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        results: dict[str, np.ndarray] = {}
        for r in range(args.rounds):
            for name, run in contenders.items():
                t = time.perf_counter()
                results[name] = run()
                times[name].append(time.perf_counter() - t)
            print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in contenders), flush=True)

    qps = {name: args.queries / statistics.median(ts) for name, ts in times.items()}
    best = max(("numpy brute force", "torch brute force"), key=qps.__getitem__)
    print(f"\n| contender | queries/s (median of {args.rounds}) | recall@10 vs exact |")
    print("|---|---|---|")
    for name in contenders:
        print(f"| {name} | {qps[name]:,.0f} | {recall(results[name], exact):.4f} |")
    print(
        f"\nindex / best brute force ({best}): {qps['index'] / qps[best]:.1f}×; "
        f"recall@10 {recall(results['index'], exact):.4f} (PQ codes alone, no re-ranking: {raw:.4f}); "
        f"build {build_s:.1f} s"
    )
    print(f"load average: {load_before:.2f} before the run, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
