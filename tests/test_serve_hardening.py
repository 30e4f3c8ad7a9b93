"""Faults of issue #18 against a real server on loopback (uvicorn in a thread)."""

from __future__ import annotations

import socket
import time

import pytest

from fromage.apps.serve import ServeConfig, create_app

from .live_server import app_config, running
from .test_pipeline import bot  # noqa: F401  (fixture)
from .test_serve_slow_client import _read_response
from .test_train import tiny_world  # noqa: F401  (fixture)

PIECE_DELAY_S = 0.05
"""Decoding slowed to 20 steps/s, so that a stream is still decoding when its client leaves."""


@pytest.fixture(scope="module")
def server(bot):  # noqa: F811
    from fromage.pipeline import AnswerBatch

    fromage, _ = bot
    real_step = AnswerBatch.step

    def slow_step(self):
        time.sleep(PIECE_DELAY_S)
        return real_step(self)

    AnswerBatch.step = slow_step  # type: ignore[method-assign]
    # One chat at a time: a stream that kept decoding would hold the next request back.
    app = create_app(fromage, ServeConfig(max_tokens_limit=256, chat_batch_size=1))
    try:
        with running(app_config(app)) as port:
            yield port
    finally:
        AnswerBatch.step = real_step  # type: ignore[method-assign]


def test_an_abandoned_stream_frees_the_model_within_a_second(server):
    """The official client reads two chunks of a long streamed answer, then closes it. Before
    the fix, the server's generator stayed suspended inside the model lock: the next request
    waited until a garbage collection happened to close it."""
    import openai

    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{server}/v1", api_key="unused", timeout=30, max_retries=0
    )
    message = [{"role": "user", "content": "tell me a story"}]
    no_images = {"max_images": 0, "ret_scale_factor": 0.0}
    stream = client.chat.completions.create(
        model="fromage", messages=message, max_tokens=100, stream=True, extra_body=no_images
    )
    pieces = iter(stream)
    next(pieces), next(pieces)
    stream.close()
    time.sleep(0.2)  # the server notices the closed connection
    start = time.monotonic()
    reply = client.chat.completions.create(
        model="fromage", messages=message, max_tokens=2, extra_body=no_images
    )
    waited = time.monotonic() - start
    assert reply.choices[0].message is not None
    # 100 slowed steps would take 5 s; a dropped stream leaves this request its own 2 steps.
    assert waited < 1.0 + 2 * PIECE_DELAY_S + 0.5, waited


def _guarded_server(bot_model, **config):
    """A real server as `fromage serve` runs it (server_config), in a thread: a context manager
    that yields its port."""
    import torch

    from fromage.apps.serve import server_config

    config.setdefault("threads", torch.get_num_threads())  # the suite's own thread count stays
    return running(
        lambda port: server_config(bot_model, ServeConfig(**config), port=port, log_level="warning")
    )


def _closed_by_server(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_idle_and_half_sent_connections_time_out_and_cannot_starve_others(bot):  # noqa: F811
    """Issue #18 item 3: connections that sent nothing, or half a request line, were never
    timed out, and once `max_connections` of them were open every other request, /health
    included, got a 503. Here 6 such connections fill a server that takes 6: they are closed
    after the head timeout, and then a client is served."""
    import httpx

    fromage, _ = bot
    with _guarded_server(
        fromage, max_connections=6, head_timeout_s=1.0, max_connections_per_client=100
    ) as port:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"GET /heal")
        start = time.monotonic()
        assert all(_closed_by_server(s, 5.0) for s in [*idle, half])
        assert time.monotonic() - start < 3.0
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        # A kept-alive connection that starts a second request and stalls is closed too.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(sock).startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /hea")
            assert _closed_by_server(sock, 5.0)


def test_one_client_cannot_hold_more_than_its_share(bot):  # noqa: F811
    fromage, _ = bot
    with _guarded_server(fromage, head_timeout_s=30.0, max_connections_per_client=3) as port:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        extra = socket.create_connection(("127.0.0.1", port))
        assert _closed_by_server(extra, 5.0)  # the fourth is closed at once
        assert not _closed_by_server(held[0], 0.5)  # the first three are kept (for now)
        for s in held:
            s.close()


def test_an_extreme_aspect_ratio_image_is_cheap_on_a_real_server(bot, monkeypatch):  # noqa: F811
    """Issue #18 item 2, on a real server: a 109-byte 10000×1 PNG took the server from 1.8 to
    3.7 GB (a 2.24M × 224 intermediate). Now no resampled image is larger than the encoder's
    input, and the request is answered."""
    import base64
    import io

    import httpx
    from PIL import Image

    fromage, _ = bot
    sizes = []
    real_resize = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)  # the server runs in this process
    buffer = io.BytesIO()
    Image.new("RGB", (10_000, 1), (255, 0, 0)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 200
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with _guarded_server(fromage, max_tokens_limit=8) as port:
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/caption", json={"image": url, "max_tokens": 2}, timeout=60
        )
    assert reply.status_code == 200, reply.text
    side = fromage.model.encoder.image_size
    assert sizes and max(w * h for w, h in sizes) <= side * side


def test_serve_leaves_the_http_side_a_core_unless_told_otherwise(bot, monkeypatch):  # noqa: F811
    """`fromage serve` sets the model's thread count (server_config): one fewer than the CPUs
    it may use by default (at least one), or exactly `threads`."""
    import os

    import torch

    from fromage.apps.serve import server_config
    from fromage.apps.serve.app import model_threads

    fromage, _ = bot
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(6)))
    assert model_threads(ServeConfig()) == 5
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0})
    assert model_threads(ServeConfig()) == 1
    assert model_threads(ServeConfig(threads=3)) == 3
    with pytest.raises(ValueError, match="-2"):
        model_threads(ServeConfig(threads=-2))
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    try:
        server_config(fromage, ServeConfig(threads=wanted))
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)
