"""Slow clients and big bodies (issue #7 item 5) against a real server on loopback: a client
that trickles its request body gets a 408 once the body timeout passes and its connection is
closed, while other clients are served; a chunked body (no declared length) over the limit
gets a 413 as soon as the limit is passed."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn

from fromage.serve import ServeConfig, create_app

from .test_pipeline import bot  # noqa: F401  (fixture)
from .test_serve_fuzz import RED_PNG
from .test_train import tiny_world  # noqa: F401  (fixture)

BODY_TIMEOUT_S = 3.0
MAX_BODY = 4096


@pytest.fixture(scope="module")
def server(bot):  # noqa: F811
    fromage, _ = bot
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServeConfig(body_timeout_s=BODY_TIMEOUT_S, max_tokens_limit=4, max_body_bytes=MAX_BODY)
    app = create_app(fromage, config)
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


def test_a_chunked_body_over_the_limit_is_refused_without_reading_it_all(server):
    sock = socket.create_connection(("127.0.0.1", server), timeout=60)
    sock.sendall(
        b"POST /v1/retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 1024
    try:
        for _ in range(2 * MAX_BODY // len(chunk)):  # twice the limit, then the server must answer
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed early: fine
    reply = _read_all(sock)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert f"over the limit of {MAX_BODY} bytes".encode() in reply


def _rss_mb() -> float:
    with open("/proc/self/status") as f:  # the server runs in this process (a thread)
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.slow
def test_memory_stays_flat_over_many_requests(server):
    """Four rounds of 60 mixed requests: once warm, the resident set does not keep growing
    (a per-request leak of even 100 KB would add 12 MB over the last two rounds)."""
    bodies = [
        ("/v1/retrieve", {"text": "a red circle", "k": 2}),
        ("/v1/caption", {"image": RED_PNG, "max_tokens": 3}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a blue square"}], "max_tokens": 3},
        ),
    ]
    after = []
    with httpx.Client(base_url=f"http://127.0.0.1:{server}", timeout=120) as http:
        for _ in range(4):
            for i in range(60):
                path, body = bodies[i % len(bodies)]
                assert http.post(path, json=body).status_code == 200
            after.append(_rss_mb())
    assert after[3] - after[1] < 10.0, after
