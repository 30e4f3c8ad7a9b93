"""Continuous batching of chat completions: concurrent chats share one decoding batch.

A decoding step of the LM reads every weight once whatever the number of rows, so 16 chats
cost little more per step than one. One worker thread owns an `AnswerBatch`: a new request
joins it at the next step boundary (up to `max_batch` rows; the others wait in arrival order),
each step runs under the model lock (retrieve/caption micro-batches get the model between
steps), and every piece goes to its request at once. A request whose client left is dropped
at the next boundary. Nothing here waits on a client: the worker only hands pieces over.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...pipeline import AnswerBatch, Ending, Fromage, PromptItem

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


class ChatScheduler:
    def __init__(self, bot: Fromage, lock: threading.Lock, max_batch: int):
        self.bot, self.lock, self.max_batch = bot, lock, max(1, max_batch)
        self.pending: queue.Queue[ChatJob] = queue.Queue()
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

    def _loop(self) -> None:
        batch = AnswerBatch(self.bot)
        jobs: dict[int, ChatJob] = {}
        while True:
            waiting = [] if jobs else [self.pending.get()]  # idle: wait for a request
            while len(jobs) + len(waiting) < self.max_batch:
                try:
                    waiting.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            self._admit(batch, jobs, waiting)
            for handle in [h for h, job in jobs.items() if job.cancelled.is_set()]:
                batch.cancel(handle)
                del jobs[handle]
            if not jobs:
                continue
            try:
                with self.lock:
                    events = batch.step()
            except Exception as error:  # every row of the failed step hears of it; a new batch starts
                log.exception("chat decoding step failed")
                for job in jobs.values():
                    _hand_over(job, error)
                batch, jobs = AnswerBatch(self.bot), {}
                continue
            self.steps += 1
            self.widest = max(self.widest, len(jobs))
            for handle, piece in events:
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
