"""A decoder's pieces handed from the model's thread to an async response.

`StreamedPieces` runs the decoding generator in a thread of its own, holding the model lock
only while it decodes, and passes each piece to the event loop. `cancel` (called when the
client goes away) makes the decoder stop at its next piece, so an abandoned stream frees the
model within one decoding step instead of holding it until garbage collection.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

_DONE = object()


class StreamedPieces:
    def __init__(self, start: Callable[[], Iterator[Any]], lock: threading.Lock):
        self._start, self._lock = start, lock
        self._cancelled = threading.Event()
        self._thread: threading.Thread | None = None
        self.ending: Any = None
        """What the decoding generator returned (pipeline.Ending), once it is done."""

    def cancel(self) -> None:
        self._cancelled.set()

    def _run(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        def hand_over(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        try:
            with self._lock:
                pieces = self._start()
                while not self._cancelled.is_set():
                    try:
                        piece = next(pieces)
                    except StopIteration as end:
                        self.ending = end.value
                        break
                    hand_over(piece)
            hand_over(_DONE)
        except BaseException as error:  # handed to the response, which reports it
            hand_over(error)

    async def __aiter__(self) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._thread = threading.Thread(target=self._run, args=(loop, queue), daemon=True)
        self._thread.start()
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def stream_error(error: Exception) -> dict[str, Any]:
    """The event that ends a stream that failed after its first bytes were sent."""
    return {"error": {"message": f"generation failed: {type(error).__name__}", "type": "server_error"}}
