"""Connections that send nothing cannot hold the server (uvicorn's HTTP/1.1 protocol, extended).

uvicorn times out a kept-alive connection only after a response: a new connection that never
sends a request, or stops in the middle of its request line or headers, is kept forever, and
counts towards `limit_concurrency`, so a few hundred of them turned every other request into a
503. This protocol closes a connection that has not completed a request head within
`head_timeout_s` (after it opened, or after its last response), and closes at once the
connections a client opens beyond `max_per_client`. Bodies have their own timeout
(middleware.py).

Written against uvicorn's `H11Protocol` (its `cycle` attribute and the hooks below); the test
suite runs it on a real server, so a uvicorn that changes them fails there.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from uvicorn.protocols.http.h11_impl import H11Protocol


def guarded_protocol(head_timeout_s: float, max_per_client: int) -> type[H11Protocol]:
    """A protocol class for `uvicorn.Config(http=…)` with these limits (and its own counts)."""
    open_per_client: Counter[str] = Counter()

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_timer: asyncio.TimerHandle | None = None
            self._host = self.client[0] if self.client else ""
            open_per_client[self._host] += 1
            if open_per_client[self._host] > max_per_client:
                transport.close()  # this client already holds its share
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_timed_out)

        def _disarm(self) -> None:
            if getattr(self, "_head_timer", None) is not None:
                self._head_timer.cancel()  # type: ignore[union-attr]
                self._head_timer = None

        def _head_timed_out(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a whole request head arrived
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's head has the same time to arrive

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if getattr(self, "_host", None) is not None:
                open_per_client[self._host] -= 1
                if open_per_client[self._host] <= 0:
                    del open_per_client[self._host]
            super().connection_lost(exc)

    return GuardedH11Protocol
