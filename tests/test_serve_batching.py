"""Issue #17: concurrent chat completions are decoded in one batch (continuous batching), and
each answer is what the same request gets alone."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient

from fromage.apps.serve import ServeConfig, create_app

from .test_pipeline import bot  # noqa: F401  (fixture)
from .test_train import tiny_world  # noqa: F401  (fixture)


def _request(i: int, stream: bool = False) -> dict:
    return {
        "messages": [{"role": "user", "content": f"a red circle {'and blue ' * i}"}],
        "max_tokens": 4 + 2 * i,  # answers end at different steps
        "temperature": 0.0 if i % 2 else 0.9,
        "seed": 100 + i,
        "ret_scale_factor": 50.0,
        "stream": stream,
    }


def _answers(app, requests: list[dict]) -> list[dict]:
    """Send all requests at once, from one thread each; → replies in request order."""
    client = TestClient(app)
    replies: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def send(i: int) -> None:
        start.wait()
        replies[i] = client.post("/v1/chat/completions", json=requests[i]).json()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return replies


def _content(reply: dict) -> tuple:
    choice = reply["choices"][0]
    images = tuple(i["id"] for i in choice["message"]["images"])
    return choice["message"]["content"], images, choice["finish_reason"], reply["usage"]["completion_tokens"]


def test_concurrent_chats_share_steps_and_answer_as_alone(bot):  # noqa: F811
    fromage, _ = bot
    requests = [_request(i) for i in range(6)]
    batched_app = create_app(fromage, ServeConfig(chat_batch_size=8))
    batched = _answers(batched_app, requests)
    alone_app = create_app(fromage, ServeConfig(chat_batch_size=1))
    alone = [TestClient(alone_app).post("/v1/chat/completions", json=r).json() for r in requests]
    assert [_content(b) for b in batched] == [_content(a) for a in alone]
    for request, reply in zip(requests, batched, strict=True):  # and `decode`, one prompt alone
        answer, ending = fromage.complete(
            [request["messages"][0]["content"]],
            seed=request["seed"],
            max_new_tokens=request["max_tokens"],
            temperature=request["temperature"],
            ret_scale_factor=request["ret_scale_factor"],
            max_rets=1,
        )
        text = "".join(p for p in answer if isinstance(p, str))
        images = tuple(p.row for p in answer if not isinstance(p, str))
        assert _content(reply) == (text, images, ending.reason, ending.tokens)
    scheduler = batched_app.state.chats
    assert scheduler.widest > 1  # rows really were decoded together
    assert scheduler.steps < sum(r["usage"]["completion_tokens"] for r in batched)
    assert alone_app.state.chats.widest == 1


def test_a_stream_and_plain_requests_in_one_batch(bot):  # noqa: F811
    fromage, _ = bot
    app = create_app(fromage, ServeConfig(chat_batch_size=4))
    client = TestClient(app)
    expected = _content(client.post("/v1/chat/completions", json=_request(3)).json())
    text = ""
    with client.stream("POST", "/v1/chat/completions", json=_request(3, stream=True)) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"]
                if delta:
                    text += delta[0]["delta"].get("content", "")
    assert text == expected[0]


def test_retrievals_ride_along_with_the_lean_decoding_steps(bot):  # noqa: F811
    """With the lean batch decoder, concurrent retrievals run inside the chats' decoding steps
    (no micro-batch of their own) and return what `Fromage.retrieve` returns alone; the chats
    answer as they do one at a time."""
    import torch

    fromage, _ = bot
    assert fromage.model.lm.enable_fast_decode(fromage.model.config.ret_layer, torch.float32)
    try:
        texts = ["a red circle", "blue square", "a green triangle and more", "red", "circle", "blue"]
        requests = [_request(i) for i in range(3)]
        batched_app = create_app(fromage, ServeConfig(batch_size=8, chat_batch_size=8))
        assert batched_app.state.chats.max_reads == 8
        client = TestClient(batched_app)
        found: list = [None] * len(texts)
        chats: list = [None] * len(requests)
        start = threading.Barrier(len(texts) + len(requests))

        def retrieve(i: int) -> None:
            start.wait()
            found[i] = client.post("/v1/retrieve", json={"text": texts[i], "k": 2 + i % 2}).json()

        def chat(i: int) -> None:
            start.wait()
            chats[i] = client.post("/v1/chat/completions", json=requests[i]).json()

        threads = [threading.Thread(target=retrieve, args=(i,)) for i in range(len(texts))]
        threads += [threading.Thread(target=chat, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for i, text in enumerate(texts):
            want = fromage.retrieve([text], k=2 + i % 2)
            assert [d["id"] for d in found[i]["data"]] == [w.row for w in want]
            assert [d["score"] for d in found[i]["data"]] == pytest.approx([w.score for w in want], abs=1e-3)
        assert batched_app.state.batchers["retrieve"].batches == 0  # none took a forward of its own
        alone_app = create_app(fromage, ServeConfig(batch_size=1, chat_batch_size=1))
        assert alone_app.state.chats.max_reads == 0
        alone = [TestClient(alone_app).post("/v1/chat/completions", json=r).json() for r in requests]
        assert [_content(c) for c in chats] == [_content(a) for a in alone]
    finally:
        fromage.model.lm.stepper = None


def test_a_retrieval_in_a_failed_step_hears_of_it(bot, monkeypatch):  # noqa: F811
    import torch

    from fromage.apps.serve.scheduler import ChatScheduler
    from fromage.pipeline import AnswerBatch

    fromage, _ = bot
    assert fromage.model.lm.enable_fast_decode(fromage.model.config.ret_layer, torch.float32)
    try:
        scheduler = ChatScheduler(fromage, threading.Lock(), max_batch=4, max_reads=4)

        def broken(self):
            raise RuntimeError("out of memory, say")

        monkeypatch.setattr(AnswerBatch, "step", broken)
        with pytest.raises(RuntimeError, match="out of memory"):
            scheduler.retrieve(["a red circle"], 2)
        monkeypatch.undo()
        assert [f.row for f in scheduler.retrieve(["a red circle"], 2)] == [
            f.row for f in fromage.retrieve(["a red circle"], k=2)
        ]  # the next batch serves again
    finally:
        fromage.model.lm.stepper = None
