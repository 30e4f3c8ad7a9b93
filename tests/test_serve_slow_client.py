"""Slow clients (issue #7 item 5): a client that trickles its request body gets a 408 once the
body timeout passes and its connection is closed; while it stalls, other clients are served."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn

from fromage.serve import ServeConfig, create_app

from .test_pipeline import bot  # noqa: F401  (fixture)
from .test_train import tiny_world  # noqa: F401  (fixture)

BODY_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def server(bot):  # noqa: F811
    fromage, _ = bot
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(fromage, ServeConfig(body_timeout_s=BODY_TIMEOUT_S, max_tokens_limit=4))
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    for _ in range(600):
        if instance.started:
            break
        time.sleep(0.05)
    assert instance.started, "server did not start"
    yield port
    instance.should_exit = True
    thread.join(timeout=30)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:  # the server closed the connection
            return b"".join(chunks)
        chunks.append(data)


def test_a_stalled_body_gets_408_and_others_are_served_meanwhile(server):
    slow = socket.create_connection(("127.0.0.1", server), timeout=60)
    body = b'{"text": "a red circle", "k": 1}'
    slow.sendall(
        b"POST /v1/retrieve HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body[:5]
    )
    # While the slow client holds its request open, the server answers everyone else.
    answered = []
    with httpx.Client(base_url=f"http://127.0.0.1:{server}", timeout=60) as http:
        for _ in range(3):
            answered.append(http.get("/health").status_code)
            answered.append(http.post("/v1/retrieve", json={"text": "a red circle", "k": 1}).status_code)
    reply = _read_all(slow)
    slow.close()
    assert answered == [200] * 6
    status_line = reply.split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 408 Request Timeout", reply[:200]
    assert b"request body not complete after 3 s (5 bytes received)" in reply


def test_a_client_that_sends_nothing_is_answered_408_too(server):
    slow = socket.create_connection(("127.0.0.1", server), timeout=60)
    slow.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    reply = _read_all(slow)
    slow.close()
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
