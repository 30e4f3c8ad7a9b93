"""A real uvicorn server on loopback, in a thread of the test process (so monkeypatches of the
model reach it): what the serve tests that need real sockets share."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running(config: Callable[[int], uvicorn.Config], start_timeout_s: float = 30.0) -> Iterator[int]:
    """Start `uvicorn.Server(config(port))` on a free loopback port, yield the port, stop it."""
    port = free_port()
    instance = uvicorn.Server(config(port))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not instance.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert instance.started, "server did not start"
        yield port
    finally:
        instance.should_exit = True
        thread.join(timeout=30)


def app_config(app, log_level: str = "warning") -> Callable[[int], uvicorn.Config]:
    return lambda port: uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level)
