"""Micro-batching: concurrent retrieve/caption requests run as one batch on the model."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from PIL import Image

from ...pipeline import Fromage


class MicroBatcher:
    """A queue and one worker thread: callers `submit` a job and block until its result; the
    worker takes the first waiting job, gathers up to `max_batch` within `wait_ms`, and runs
    them with one `run(jobs) -> results` call while holding `lock`."""

    def __init__(
        self, run: Callable[[list[Any]], list[Any]], lock: threading.Lock, max_batch: int, wait_ms: float
    ):
        self.run, self.lock = run, lock
        self.max_batch, self.wait_s = max(1, max_batch), wait_ms / 1000
        self.jobs: queue.Queue[tuple[Any, Future]] = queue.Queue()
        self.batches = 0
        threading.Thread(target=self._loop, daemon=True, name="fromage-batcher").start()

    def submit(self, job: Any) -> Any:
        future: Future = Future()
        self.jobs.put((job, future))
        return future.result()

    def _loop(self) -> None:
        while True:
            batch = [self.jobs.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                with self.lock:
                    results = self.run([job for job, _ in batch])
            except Exception as error:  # each caller sees the failure, the worker lives on
                for _, future in batch:
                    future.set_exception(error)
                continue
            self.batches += 1
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)


def caption_jobs(bot: Fromage, jobs: list[tuple[Image.Image, int]]) -> list[str]:
    """Jobs with the same token budget are captioned together."""
    out = [""] * len(jobs)
    for budget in {n for _, n in jobs}:
        rows = [i for i, (_, n) in enumerate(jobs) if n == budget]
        texts = bot.caption_batch([jobs[i][0] for i in rows], max_new_tokens=budget)
        for i, text in zip(rows, texts, strict=True):
            out[i] = text
    return out
