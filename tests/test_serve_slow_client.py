"""Slow clients and big bodies (issue #7 item 5) against a real server on loopback: a client
that trickles its request body gets a 408 once the body timeout passes and its connection is
closed, while other clients are served; a chunked body (no declared length) over the limit
gets a 413 as soon as the limit is passed."""

from __future__ import annotations

import socket

import httpx
import pytest

from fromage.apps.serve import ServeConfig, create_app

from .live_server import app_config, running
from .test_pipeline import bot  # noqa: F401  (fixture)
from .test_serve_fuzz import RED_PNG
from .test_train import tiny_world  # noqa: F401  (fixture)

BODY_TIMEOUT_S = 3.0
MAX_BODY = 4096


@pytest.fixture(scope="module")
def server(bot):  # noqa: F811
    fromage, _ = bot
    config = ServeConfig(body_timeout_s=BODY_TIMEOUT_S, max_tokens_limit=4, max_body_bytes=MAX_BODY)
    with running(app_config(create_app(fromage, config))) as port:
        yield port


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:  # the server closed the connection
            return b"".join(chunks)
        chunks.append(data)


def _read_response(sock: socket.socket) -> bytes:
    """One whole response (head plus Content-Length bytes of body), leaving the socket open."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, f"connection closed before a whole response head: {data[:200]!r}"
        data += more
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(
        next(
            line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")
        )
    )
    while len(body) < length:
        more = sock.recv(65536)
        assert more, f"connection closed {len(body)} bytes into a {length}-byte body"
        body += more
    return head + b"\r\n\r\n" + body


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
    slow.sendall(
        b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    reply = _read_all(slow)
    slow.close()
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]


def test_a_chunked_body_over_the_limit_is_refused_without_reading_it_all(server):
    sock = socket.create_connection(("127.0.0.1", server), timeout=20)
    sock.sendall(
        b"POST /v1/retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = f"{1024:x}\r\n".encode() + b"x" * 1024 + b"\r\n"
    sock.sendall(chunk * (MAX_BODY // 1024 + 1))  # just over the limit, with no end in sight
    first = _read_response(sock)  # the answer comes without the body ending
    assert first.startswith(b"HTTP/1.1 413 "), first[:200]
    assert f"over the limit of {MAX_BODY} bytes".encode() in first
    # A client still sending after the answer must not keep the connection: it is closed.
    # (Kept alive, late chunks would cancel uvicorn's idle timer and hold it open forever.)
    try:
        for _ in range(4):
            sock.sendall(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # already closed: fine
    try:
        reply = first + _read_all(sock)
    except ConnectionResetError:
        reply = first  # closed with our late bytes unread: a reset instead of a clean EOF
    sock.close()
    assert b"connection: close" in reply.lower(), reply[:300]


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
