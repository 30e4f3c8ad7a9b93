"""`fromage features`: run the frozen image encoder over a collection once, as its own step.

Features land in the shared on-disk cache (data/feature_cache.py, keyed by encoder id, image digest
and view) that `fromage train` and `fromage index` read, so a later training run or index build
on the same images encodes nothing. Sources: whatever `fromage index` accepts (webdataset tar
shards, a folder, TSV/JSONL, a built-in set).

Parallelism, one simple scheme: `num_processes` workers started with `spawn` through
`concurrent.futures.ProcessPoolExecutor`. Worker r of N takes shards r::N of a shard source
(it lists them itself, so no process holds the whole collection) or examples r::N of any other
source, loads its own encoder, and writes its own cache shards (unique names + atomic rename, so
workers never coordinate). The CPU threads are split evenly between workers. Progress comes
back through a queue to one bar in the parent.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..config import FEATURE_BATCH_SIZE, MAX_BAD_FRACTION, EncoderConfig
from ..data.examples import Example
from ..data.readers import BadInputLog
from ..data.shards import is_shard_source, read_shard, shard_paths

CHUNK = 256
"""Examples a worker handles between progress reports (and cache writes)."""


@dataclass
class FeaturesReport:
    images: int
    """Images listed (bad samples not included)."""
    encoded: int
    """(image, view) features computed by this run."""
    cached: int
    """(image, view) features found in the cache already."""
    bad: BadInputLog
    seconds: float
    processes: int
    encoder_id: str
    cache_dir: Path

    @property
    def images_per_second(self) -> float:
        return self.encoded / max(self.seconds, 1e-9)


@dataclass
class _Task:
    rank: int
    encoder: EncoderConfig
    views: int
    batch_size: int
    device: str
    threads: int
    """torch threads for this worker; 0 leaves the process's setting alone."""
    shards: list[str] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)


@dataclass
class _Result:
    seen: int
    encoded: int
    cached: int
    counts: dict[str, int]
    messages: list[str]
    encoder_id: str
    cache_dir: str


def extract_collection(
    source: str,
    encoder: EncoderConfig,
    num_processes: int = 1,
    batch_size: int = FEATURE_BATCH_SIZE,
    views: int = 0,
    image_dir: str | None = None,
    max_bad_fraction: float = MAX_BAD_FRACTION,
    device: str = "cpu",
) -> FeaturesReport:
    """Fill the feature cache for every image of `source` (view 0, plus `views` augmented
    renderings, as training with `data.augment_views = views` reads them)."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    start = time.time()
    bad = BadInputLog()
    shards: list[str] = []
    examples: list[Example] = []
    if is_shard_source(source):
        shards = shard_paths(source)
        units: int = len(shards)
    else:
        from ..data.sources import read_source

        examples = read_source(source, image_dir, bad)
        bad.check(max(len(examples), 1), max_bad_fraction)
        units = len(examples)
    workers = max(1, min(num_processes, units))
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0
    tasks = [
        _Task(
            rank,
            encoder,
            views,
            batch_size,
            _device_of(device, rank),
            threads,
            shards[rank::workers],
            examples[rank::workers],
        )
        for rank in range(workers)
    ]
    bar = tqdm(total=len(examples) if examples else None, desc="features", unit="img")
    if workers == 1:
        results = [_work(tasks[0], bar.update)]
    else:
        results = _run_processes(tasks, bar)
    bar.close()
    for result in results:
        bad.counts.update(result.counts)
        bad.messages.extend(result.messages[: max(0, 50 - len(bad.messages))])
    seen = sum(r.seen for r in results)
    report = FeaturesReport(
        images=seen,
        encoded=sum(r.encoded for r in results),
        cached=sum(r.cached for r in results),
        bad=bad,
        seconds=time.time() - start,
        processes=workers,
        encoder_id=results[0].encoder_id,
        cache_dir=Path(results[0].cache_dir),
    )
    bad.check(max(seen, 1), max_bad_fraction)
    return report


def _device_of(device: str, rank: int) -> str:
    """`cuda` spreads workers over the visible GPUs; anything else is used as given."""
    if device != "cuda":
        return device
    import torch

    return f"cuda:{rank % max(torch.cuda.device_count(), 1)}"


def _run_processes(tasks: list[_Task], bar: tqdm) -> list[_Result]:
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
    progress: multiprocessing.Queue[int] = context.Queue()
    with ProcessPoolExecutor(
        len(tasks), mp_context=context, initializer=_set_progress_queue, initargs=(progress,)
    ) as pool:
        futures = [pool.submit(_work_in_process, task) for task in tasks]
        while not all(f.done() for f in futures):
            try:
                bar.update(progress.get(timeout=0.2))
            except queue.Empty:
                pass
        results = [f.result() for f in futures]  # re-raises a worker's error here
    while True:
        try:
            bar.update(progress.get_nowait())
        except queue.Empty:
            break
    return results


_progress_queue: multiprocessing.Queue[int] | None = None


def _set_progress_queue(progress: multiprocessing.Queue[int]) -> None:
    global _progress_queue
    _progress_queue = progress


def _work_in_process(task: _Task) -> _Result:
    queue_ = _progress_queue
    return _work(task, (lambda n: queue_.put(n)) if queue_ is not None else (lambda n: None))


def _work(task: _Task, progress: Callable[[int], None]) -> _Result:
    """One worker: list its shards (or take its examples), encode what the cache lacks."""
    import torch

    from ..backbones import load_encoder
    from ..data.dataset import fill_cache
    from ..data.feature_cache import FeatureCache
    from ..paths import subdir

    if task.threads:
        torch.set_num_threads(task.threads)
    encoder = load_encoder(task.encoder, device=task.device)
    cache = FeatureCache(subdir("features"), encoder.encoder_id)
    bad = BadInputLog()
    seen = encoded = cached = 0

    def chunks():
        for shard in task.shards:
            listed = read_shard(shard, bad)
            for s in range(0, len(listed), CHUNK):
                yield listed[s : s + CHUNK]
        for s in range(0, len(task.examples), CHUNK):
            yield task.examples[s : s + CHUNK]

    for part in chunks():
        fill = fill_cache(
            part, encoder, bad, task.views, cache, batch_size=task.batch_size, progress=lambda n: None
        )
        seen, encoded, cached = seen + len(part), encoded + fill.encoded, cached + fill.cached
        progress(len(part))
    counts: Counter[str] = bad.counts
    return _Result(seen, encoded, cached, dict(counts), bad.messages, encoder.encoder_id, str(cache.dir))
