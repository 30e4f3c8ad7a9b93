"""An answer's pieces handed from the chat scheduler's thread to a response.

`AsyncPieces` passes each piece to the event loop of a streaming response; `BlockingPieces`
to a synchronous handler. Both end at the answer's `Ending` (kept as `.ending`) and raise the
exception that ended a failed answer. The scheduler never waits on either: it only enqueues.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ...pipeline import Ending


class AsyncPieces:
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.ending: Ending | None = None

    def emit(self, piece: Any) -> None:  # called from the scheduler's thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, piece)

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            piece = await self._queue.get()
            if not _goes_on(piece, self):
                return
            yield piece


class BlockingPieces:
    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self.ending: Ending | None = None

    def emit(self, piece: Any) -> None:
        self._queue.put(piece)

    def __iter__(self) -> Iterator[Any]:
        while True:
            piece = self._queue.get()
            if not _goes_on(piece, self):
                return
            yield piece


def _goes_on(piece: Any, pieces: AsyncPieces | BlockingPieces) -> bool:
    """False at the answer's `Ending` (kept on `pieces`); raises the error that ended it."""
    if isinstance(piece, BaseException):
        raise piece
    if isinstance(piece, Ending):
        pieces.ending = piece
        return False
    return True


def stream_error(error: Exception) -> dict[str, Any]:
    """The event that ends a stream that failed after its first bytes were sent."""
    return {"error": {"message": f"generation failed: {type(error).__name__}", "type": "server_error"}}
