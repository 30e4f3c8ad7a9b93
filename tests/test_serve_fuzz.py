"""Fuzzing the HTTP API with hypothesis-generated requests (issue #7 item 5, part): message
lists with nested content parts, huge and negative numbers, unicode and empty strings, wrong
types, extra keys. Whatever comes in, the answer is a 2xx or a 4xx naming the problem; never
a 5xx and never a traceback."""

from __future__ import annotations

import json

import hypothesis
import pytest
from fastapi.testclient import TestClient
from hypothesis import strategies as st

from fromage.apps.serve import ServeConfig, create_app

from .test_pipeline import bot  # noqa: F401  (fixture)
from .test_train import tiny_world  # noqa: F401  (fixture)

RED_PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGP8z8DAwMDAxMDAwMDAAAANHQEDasKb6QAAAABJRU5ErkJggg=="

texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "red apple", "🍎" * 30, "\u202e" + "abc", "a" * 2000]),
)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.text(max_size=5),
)
image_urls = st.one_of(
    st.just(RED_PNG),
    st.sampled_from(["", "data:", "data:image/png;base64,", "file:///etc/passwd"]),
    st.text(max_size=30),
)
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": texts})
image_part = st.fixed_dictionaries(
    {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": image_urls})}
)
odd_part = st.one_of(
    st.dictionaries(st.text(max_size=8), st.one_of(texts, numbers), max_size=3),
    st.lists(texts, max_size=2),
    numbers,
)
content = st.one_of(texts, st.lists(st.one_of(text_part, image_part, odd_part), max_size=4), numbers)
message = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", "", "USER"]), "content": content}
    ),
    st.dictionaries(st.text(max_size=8), content, max_size=3),
)
request = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(message, max_size=4), numbers, texts)},
    optional={
        "max_tokens": st.one_of(st.integers(min_value=-5, max_value=4), numbers),
        "temperature": numbers,
        "top_p": numbers,
        "stream": st.one_of(st.booleans(), numbers),
        "stop": st.one_of(texts, st.lists(texts, max_size=3), numbers),
        "n": numbers,
        "seed": numbers,
        "ret_scale_factor": numbers,
        "max_images": numbers,
        "bogus": texts,
    },
)


@pytest.fixture(scope="module")
def client(bot):  # noqa: F811
    fromage, _ = bot
    return TestClient(create_app(fromage, ServeConfig(max_body_bytes=100_000, max_tokens_limit=4)))


def _post(client, path, body):
    # NaN and Infinity go out as the bare literals many JSON encoders write.
    raw = json.dumps(body, allow_nan=True)
    return client.post(path, content=raw, headers={"content-type": "application/json"})


def _check(reply) -> None:
    assert reply.status_code < 500, reply.text[:500]
    assert "Traceback" not in reply.text
    if reply.status_code >= 400:
        assert reply.json()["error"]["message"]


@hypothesis.settings(max_examples=150, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(body=request)
def test_chat_completions_never_answer_5xx(client, body):
    _check(_post(client, "/v1/chat/completions", body))


@hypothesis.settings(max_examples=80, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(
    body=st.one_of(
        st.fixed_dictionaries(
            {"text": st.one_of(texts, numbers)},
            optional={"k": numbers, "images": st.lists(image_urls, max_size=3)},
        ),
        st.fixed_dictionaries({"image": st.one_of(image_urls, numbers)}, optional={"max_tokens": numbers}),
    )
)
def test_retrieve_and_caption_never_answer_5xx(client, body):
    path = "/v1/retrieve" if "text" in body else "/v1/caption"
    _check(_post(client, path, body))
