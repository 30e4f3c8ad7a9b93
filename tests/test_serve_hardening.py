"""Faults of issue #18 against a real server on loopback (uvicorn in a thread)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn

from fromage.apps.serve import ServeConfig, create_app

from .test_pipeline import bot  # noqa: F401  (fixture)
from .test_train import tiny_world  # noqa: F401  (fixture)

PIECE_DELAY_S = 0.05
"""Decoding slowed to 20 pieces/s, so that a stream is still decoding when its client leaves."""


@pytest.fixture(scope="module")
def server(bot):  # noqa: F811
    fromage, _ = bot
    real_stream = fromage.stream

    def slow_stream(*args, **kwargs):
        for piece in real_stream(*args, **kwargs):
            time.sleep(PIECE_DELAY_S)
            yield piece

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fromage.stream = slow_stream
    app = create_app(fromage, ServeConfig(max_tokens_limit=256))
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    for _ in range(600):
        if instance.started:
            break
        time.sleep(0.05)
    assert instance.started, "server did not start"
    try:
        yield port
    finally:
        instance.should_exit = True
        thread.join(timeout=30)
        fromage.stream = real_stream


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
        model="fromage", messages=message, max_tokens=200, stream=True, extra_body=no_images
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
    # 200 slowed pieces would take 10 s; a freed lock leaves this request its own 2 pieces.
    assert waited < 1.0 + 2 * PIECE_DELAY_S + 0.5, waited
