"""An image index of 10M × 256 built, saved, loaded and searched in bounded memory (issue #6).

    .venv/bin/python bench/large_index.py [--n 10000000] [--dim 256] [--queries 500] [--keep DIR]

What `fromage index` does for a collection of millions, minus the image encoder (10M images
cannot be embedded on 2 cores): clustered unit vectors (bench/retrieval.py's mixture) are
written in chunks to a memory-mapped `embeddings.npy` and a `metadata.jsonl` with a path,
caption and SHA-1 digest per row, then
1. `ImageIndex.build(memmap, JsonlRows(metadata), ..., "ivfpq")`: train on a sample, add in
   chunks, measure recall@10 against exact search (1,000 indexed rows as queries);
2. `save` (atomic; SHA-256 of every file);
3. in a fresh process: `ImageIndex.load` (index.faiss and embeddings memory-mapped, metadata
   parsed per row), `--queries` held-out queries through `search` (PQ candidates re-scored
   exactly), the metadata of every hit read, and one `row_of_digest` lookup (its first call
   builds the digest table);
4. in another fresh process: `--grow` new rows added the way a re-run of `fromage index` adds
   them (`load`, `extend`, `save`), then a load of the grown index.
Reported for each phase: wall time and peak memory, both the whole resident set (VmRSS, which
counts pages of mapped files the kernel may drop) and the process's own allocations (RssAnon),
next to the size of the float32 matrix. One run; nothing here is compared across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from fromage.index.jsonl_rows import JsonlRows
from fromage.index.store import ImageIndex

sys.path.insert(0, str(Path(__file__).parent))
from retrieval import PeakMemory, clustered  # noqa: E402  (a sibling bench script)

GIB = 2**30


def write_metadata(path: Path, n: int, chunk: int = 100_000) -> None:
    with path.open("w", encoding="utf-8") as f:
        for start in range(0, n, chunk):
            f.writelines(
                json.dumps(
                    {
                        "path": f"shards/{i // 10_000:05d}.tar#{i:09d}.jpg",
                        "caption": f"synthetic image {i}",
                        "digest": hashlib.sha1(str(i).encode()).hexdigest(),
                    }
                )
                + "\n"
                for i in range(start, min(n, start + chunk))
            )


def memory(peak: PeakMemory) -> dict[str, float]:
    return {"peak_rss_gib": round(peak.rss / GIB, 2), "peak_anon_gib": round(peak.anon / GIB, 2)}


def make_data(args: argparse.Namespace, work: Path) -> np.ndarray:
    """The rows, held-out queries and metadata; with --reuse, those already in `work` when
    their shapes match (generating 10M rows takes ~4 minutes)."""
    path = work / "embeddings.npy"
    if args.reuse and path.exists() and (work / "metadata.jsonl").exists():
        data = np.load(path, mmap_mode="r")
        queries = np.load(work / "queries.npy", mmap_mode="r")
        if data.shape == (args.n, args.dim) and queries.shape == (args.queries, args.dim):
            print(f"data: reusing {path}", flush=True)
            return data
    t = time.perf_counter()
    data = clustered(path, args.n, args.dim, args.clusters, seed=1)
    clustered(work / "queries.npy", args.queries, args.dim, args.clusters, seed=2)
    write_metadata(work / "metadata.jsonl", args.n)
    print(f"data: {args.n:,} × {args.dim} + metadata, written in {time.perf_counter() - t:.0f} s", flush=True)
    return data


def build(args: argparse.Namespace, work: Path) -> dict:
    data = make_data(args, work)
    report: dict = {"n": args.n, "dim": args.dim, "matrix_gib": round(data.nbytes / GIB, 2)}
    with PeakMemory() as peak:
        t = time.perf_counter()
        index = ImageIndex.build(data, JsonlRows(work / "metadata.jsonl"), "bench", "bench", "ivfpq")
        report["build"] = {"seconds": round(time.perf_counter() - t, 1), **memory(peak)}
    report["params"], report["recall_at_build"] = index.manifest.params, index.manifest.recall
    print(f"build: {report['build']}; {report['params']}; recall {report['recall_at_build']}", flush=True)
    with PeakMemory() as peak:
        t = time.perf_counter()
        index.save(work / "index")
        report["save"] = {"seconds": round(time.perf_counter() - t, 1), **memory(peak)}
    print(f"save: {report['save']}", flush=True)
    return report


def serve_side(work: Path, k: int = 10) -> dict:
    """Runs in a fresh process: load, search, read metadata, look a digest up."""
    report: dict = {}
    queries = np.load(work / "queries.npy")
    with PeakMemory() as peak:
        t = time.perf_counter()
        index = ImageIndex.load(work / "index")
        report["load"] = {"seconds": round(time.perf_counter() - t, 2), **memory(peak)}
    with PeakMemory() as peak:
        t = time.perf_counter()
        _, ids = index.search(queries, k)
        captions = [index.metadata[int(i)]["caption"] for i in ids.ravel()]
        seconds = time.perf_counter() - t
        report["search"] = {
            "queries": len(queries),
            "queries_per_s": round(len(queries) / seconds, 1),
            "rows_read": len(captions),
            **memory(peak),
        }
    with PeakMemory() as peak:
        target = len(index) - 7
        digest = index.metadata[target]["digest"]  # (the last rows may have been added by --grow)
        t = time.perf_counter()
        row = index.row_of_digest(digest)
        first = time.perf_counter() - t
        t = time.perf_counter()
        index.row_of_digest(hashlib.sha1(b"3").hexdigest())
        report["digest_lookup"] = {
            "correct": row == target,
            "first_call_s": round(first, 2),
            "next_call_ms": round((time.perf_counter() - t) * 1000, 3),
            **memory(peak),
        }
    return report


def grow(work: Path, rows: int, clusters: int) -> dict:
    """Runs in a fresh process: what re-running `fromage index` with `rows` new images does to
    the saved index (load, extend, save: an atomic replace), then a load of the result."""
    index = ImageIndex.load(work / "index")
    n, dim = index.manifest.count, index.manifest.dim
    new = np.array(clustered(work / "new.npy", rows, dim, clusters, seed=3))
    start = n + 1_000_000_000  # digests no indexed row has
    metadata = [
        {
            "path": f"new/{i}.jpg",
            "caption": f"new image {i}",
            "digest": hashlib.sha1(str(i).encode()).hexdigest(),
        }
        for i in range(start, start + rows)
    ]
    with PeakMemory() as peak:
        t = time.perf_counter()
        grown = index.extend(new, metadata)
        extend_s = time.perf_counter() - t
        grown.save(work / "index")
        report = {
            "rows_added": rows,
            "extend_seconds": round(extend_s, 1),
            "save_seconds": round(time.perf_counter() - t - extend_s, 1),
            "retrained": grown.manifest.params != index.manifest.params,
            "recall": grown.manifest.recall,
            **memory(peak),
        }
    again = ImageIndex.load(work / "index")
    report["count_after"] = len(again)
    report["new_row_found"] = again.row_of_digest(metadata[-1]["digest"]) == n + rows - 1
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=4096)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--keep", type=Path, help="work here and keep the files (default: a temporary directory)"
    )
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--grow", type=int, default=10_000, help="rows added to the saved index at the end")
    parser.add_argument("--reuse", action="store_true", help="with --keep: reuse the rows generated before")
    parser.add_argument("--phase", choices=["serve", "grow"], help=argparse.SUPPRESS)  # the child processes
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    if args.phase == "serve":
        print(json.dumps(serve_side(args.work)))
        return {}
    if args.phase == "grow":
        print(json.dumps({"grow": grow(args.work, args.grow, args.clusters)}))
        return {}
    with contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = build(args, work)
        root = str(Path(__file__).resolve().parents[1])  # `fromage` importable without an install
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        }
        for phase in ("serve", "grow"):  # each in a fresh process: its memory is its own
            child = [
                sys.executable,
                __file__,
                f"--phase={phase}",
                f"--work={work}",
                f"--threads={args.threads}",
            ]
            child += [f"--grow={args.grow}", f"--clusters={args.clusters}"]
            done = subprocess.run(child, check=True, capture_output=True, text=True, env=env)
            report.update(json.loads(done.stdout.strip().splitlines()[-1]))
    for phase in ("load", "search", "digest_lookup", "grow"):
        print(f"{phase}: {report[phase]}")
    print(
        f"\n{args.n:,} × {args.dim} ({report['matrix_gib']} GiB of float32): build {report['build']['seconds']} s "
        f"(peak own memory {report['build']['peak_anon_gib']} GiB), recall@10 "
        f"{report['recall_at_build']['recall']}; load {report['load']['seconds']} s "
        f"(own memory {report['load']['peak_anon_gib']} GiB); {report['search']['queries_per_s']} queries/s; "
        f"+{args.grow:,} rows: extend + save {report['grow']['extend_seconds'] + report['grow']['save_seconds']:.0f} s "
        f"(peak own memory {report['grow']['peak_anon_gib']} GiB)"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
