"""Continuous batching of chat completions: concurrent chats share one decoding batch.

A decoding step of the LM reads every weight once whatever the number of rows, so 16 chats
cost little more per step than one. One worker thread owns an `AnswerBatch`: a new request
joins it at the next step boundary (up to `max_batch` rows; the others wait in arrival order),
each step runs under the model lock (caption micro-batches, and retrievals when they do not
ride along, get the model between steps), and every piece goes to its request at once. A
request whose client left is dropped at the next boundary. Nothing here waits on a client:
the worker only hands pieces over.

Where the batch can read (`AnswerBatch.reads`: the lean batch decoder), retrievals ride
along: up to `max_reads` waiting ones run in the next step's forward, with the decoding rows
and the joining prompts, instead of a forward of their own (each forward costs ~55 ms on 2
cores beyond its products; BENCHMARKS.md, issue #17).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ...pipeline import AnswerBatch, Ending, Fromage, PromptItem, RetrievedImage

log = logging.getLogger(__name__)

Emit = Callable[[Any], None]
"""Receives each piece of an answer (text, a list of images, then its `Ending`), or the
exception that ended it; called from the worker thread."""


@dataclass
class ChatJob:
    prompt: Sequence[PromptItem]
    settings: dict[str, Any]
    seed: int | None
    emit: Emit
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class ReadJob:
    """A retrieval that rides along with the next decoding step."""

    prompt: Sequence[PromptItem]
    k: int
    result: Future = field(default_factory=Future)


class ChatScheduler:
    def __init__(self, bot: Fromage, lock: threading.Lock, max_batch: int, max_reads: int = 0):
        self.bot, self.lock, self.max_batch = bot, lock, max(1, max_batch)
        self.max_reads = max_reads if AnswerBatch.reads(bot) else 0
        """Retrievals one step takes along (0: they keep their own micro-batches)."""
        self.pending: queue.Queue[ChatJob | ReadJob] = queue.Queue()
        self.steps = 0
        self.widest = 0
        """The most rows one step has decoded (the benchmark reports it)."""
        threading.Thread(target=self._loop, daemon=True, name="fromage-chat").start()

    def submit(
        self, prompt: Sequence[PromptItem], settings: dict[str, Any], seed: int | None, emit: Emit
    ) -> ChatJob:
        job = ChatJob(prompt, settings, seed, emit)
        self.pending.put(job)
        return job

    def retrieve(self, prompt: Sequence[PromptItem], k: int) -> list[RetrievedImage]:
        """Run a retrieval in the next decoding step (needs `max_reads`); blocks until it has."""
        if not self.max_reads:
            raise ValueError("this scheduler does not take retrievals (max_reads is 0)")
        job = ReadJob(prompt, k)
        self.pending.put(job)
        return job.result.result()

    def _loop(self) -> None:
        batch = AnswerBatch(self.bot)
        jobs: dict[int, ChatJob] = {}
        reads: dict[int, ReadJob] = {}
        chats_waiting: deque[ChatJob] = deque()
        reads_waiting: deque[ReadJob] = deque()

        def take(job: ChatJob | ReadJob) -> None:
            (reads_waiting if isinstance(job, ReadJob) else chats_waiting).append(job)  # type: ignore[arg-type]

        while True:
            if not (jobs or chats_waiting or reads_waiting):
                take(self.pending.get())  # idle: wait for a request
            while True:
                try:
                    take(self.pending.get_nowait())
                except queue.Empty:
                    break
            admit = [
                chats_waiting.popleft() for _ in range(min(len(chats_waiting), self.max_batch - len(jobs)))
            ]
            self._admit(batch, jobs, admit)
            self._admit_reads(
                batch,
                reads,
                [reads_waiting.popleft() for _ in range(min(len(reads_waiting), self.max_reads))],
            )
            for handle in [h for h, job in jobs.items() if job.cancelled.is_set()]:
                batch.cancel(handle)
                del jobs[handle]
            if not jobs and not reads:
                continue
            try:
                with self.lock:
                    events = batch.step()
            except Exception as error:  # every row of the failed step hears of it; a new batch starts
                log.exception("chat decoding step failed")
                for job in jobs.values():
                    _hand_over(job, error)
                for read in reads.values():
                    read.result.set_exception(error)
                batch, jobs, reads = AnswerBatch(self.bot), {}, {}
                continue
            self.steps += 1
            self.widest = max(self.widest, len(jobs))
            for handle, piece in events:
                if handle in reads:
                    reads.pop(handle).result.set_result(piece)
                    continue
                listener = jobs.get(handle)
                if listener is None:
                    continue
                if not _hand_over(listener, piece):
                    batch.cancel(handle)  # its response is gone: stop decoding it
                    del jobs[handle]
                elif isinstance(piece, Ending):
                    del jobs[handle]
            time.sleep(0)  # let a thread waiting for the model lock (retrieve, caption) take it

    def _admit(self, batch: AnswerBatch, jobs: dict[int, ChatJob], waiting: list[ChatJob]) -> None:
        """Prefill the waiting requests, those with the same settings in one forward."""
        groups: dict[str, list[ChatJob]] = {}
        for job in waiting:
            if not job.cancelled.is_set():
                groups.setdefault(repr(sorted(job.settings.items())), []).append(job)
        for group in groups.values():
            try:
                with self.lock:
                    handles = batch.add(
                        [j.prompt for j in group], [j.seed for j in group], **group[0].settings
                    )
            except Exception:  # one bad prompt must not fail the others: admit them one by one
                handles = []
                for job in group:
                    try:
                        with self.lock:
                            handles += batch.add([job.prompt], [job.seed], **job.settings)
                    except Exception as error:
                        _hand_over(job, error)
                        handles.append(-1)
            for handle, job in zip(handles, group, strict=True):
                if handle >= 0:
                    jobs[handle] = job

    def _admit_reads(self, batch: AnswerBatch, reads: dict[int, ReadJob], waiting: list[ReadJob]) -> None:
        """Encode the waiting retrievals into the next step (a bad prompt fails alone)."""
        if not waiting:
            return
        try:
            with self.lock:
                handles = batch.read([j.prompt for j in waiting], [j.k for j in waiting])
            reads.update(zip(handles, waiting, strict=True))
        except Exception:
            for job in waiting:
                try:
                    with self.lock:
                        reads.update(zip(batch.read([job.prompt], [job.k]), [job], strict=True))
                except Exception as error:
                    job.result.set_exception(error)


def _hand_over(job: ChatJob, piece: Any) -> bool:
    """Give a piece to its request; False when the request can no longer take it (its event
    loop closed): the worker must outlive any one response."""
    try:
        job.emit(piece)
    except Exception:
        log.warning("a chat response could not take its next piece; dropping it", exc_info=True)
        job.cancel()
        return False
    return True
