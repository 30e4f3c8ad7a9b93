import base64
import io
import json
import threading
import time
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fromage.apps.serve import ServeConfig, create_app

from .live_server import app_config, running
from .test_pipeline import bot  # noqa: F401  (fixture)
from .test_train import tiny_world  # noqa: F401  (fixture)


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


RED = Image.new("RGB", (32, 32), (220, 20, 20))
CHAT = {"max_tokens": 6, "ret_scale_factor": 1e6}


@pytest.fixture(scope="module")
def client(bot):  # noqa: F811
    fromage, _ = bot
    return TestClient(create_app(fromage, ServeConfig(max_body_bytes=200_000, max_image_pixels=10_000)))


def message(*parts):
    return [{"role": "user", "content": list(parts)}]


def test_health_models_and_chat_with_an_image(client):
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/v1/models").json()["data"][0]["id"] == "fromage-default"
    body = {
        "messages": message(
            {"type": "image_url", "image_url": {"url": data_url(RED)}}, {"type": "text", "text": "a red"}
        ),
        **CHAT,
    }
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    msg = reply.json()["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    usage = reply.json()["usage"]
    assert usage["prompt_tokens"] > 2 and usage["completion_tokens"] >= 1  # the [RET] at least
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert len(msg["images"]) == 1
    picture = client.get(msg["images"][0]["url"])
    assert picture.status_code == 200 and Image.open(io.BytesIO(picture.content)).size[0] > 0
    # Streamed: the same text (greedy), the image as a structured delta, then [DONE].
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as events:
        lines = [line for line in events.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    images = [i for c in chunks for i in c["choices"][0]["delta"].get("images", [])]
    assert text == msg["content"] and [i["id"] for i in images] == [i["id"] for i in msg["images"]]
    # Both forms end for the same reason (6 tokens of a tiny random model: cut, "length").
    assert (
        chunks[-1]["choices"][0]["finish_reason"] == reply.json()["choices"][0]["finish_reason"] == "length"
    )


def test_retrieve_and_caption(client, bot):  # noqa: F811
    fromage, _ = bot
    found = client.post("/v1/retrieve", json={"text": "a green square", "k": 3}).json()["data"]
    assert [f["id"] for f in found] == [r.row for r in fromage.retrieve(["a green square"], k=3)]
    with_image = client.post("/v1/retrieve", json={"text": "red", "images": [data_url(RED)], "k": 2})
    assert with_image.status_code == 200 and len(with_image.json()["data"]) == 2
    caption = client.post("/v1/caption", json={"image": data_url(RED), "max_tokens": 4})
    assert caption.status_code == 200 and isinstance(caption.json()["caption"], str)


@pytest.mark.parametrize(
    ("case", "status", "words"),
    [
        ("invalid json", 400, "invalid JSON"),
        ("unknown field", 400, "unknown field 'bogus'"),
        ("bad base64", 400, "invalid base64"),
        ("not an image", 400, "not a readable image"),
        ("bad role", 400, "role"),
        ("too many images", 400, "too many images"),
        ("too many pixels", 400, "pixels, limit 10000"),
        ("body too large", 413, "limit 200000"),
        ("max_tokens too large", 400, "limit 256"),
        ("remote url", 400, "host 'example.com' is not allowed"),
        ("no such image", 404, "no image 999999"),
        ("empty prompt", 400, "no text and no image"),
        ("prompt too long", 400, "tokens, limit 1024"),
        # Issue #18 item 4: each of these was a 500 (or accepted).
        ("empty stop string", 400, "stop"),
        ("seed of 2**64", 400, "seed"),
        ("lone surrogate", 400, "lone surrogate"),
        ("infinite ret_scale_factor", 400, "ret_scale_factor"),
        ("text/plain body", 415, "Content-Type must be application/json"),
    ],
)
def test_bad_inputs_get_a_4xx_that_names_the_problem(client, case, status, words):
    def image_part(url):
        return {"type": "image_url", "image_url": {"url": url}}

    post = "/v1/chat/completions"
    requests = {
        "invalid json": dict(content=b"{not json", headers={"content-type": "application/json"}),
        "unknown field": dict(json={"messages": message({"type": "text", "text": "hi"}), "bogus": 1}),
        "bad base64": dict(json={"messages": message(image_part("data:image/png;base64,@@@"))}),
        "not an image": dict(
            json={
                "messages": message(
                    image_part("data:image/png;base64," + base64.b64encode(b"hello").decode())
                )
            }
        ),
        "bad role": dict(json={"messages": [{"role": "wizard", "content": "hi"}]}),
        "too many images": dict(json={"messages": message(*[image_part(data_url(RED))] * 5)}),
        "too many pixels": dict(
            json={"messages": message(image_part(data_url(Image.new("RGB", (101, 100)))))}
        ),
        "body too large": dict(json={"messages": message({"type": "text", "text": "x" * 300_000})}),
        "max_tokens too large": dict(
            json={"messages": message({"type": "text", "text": "hi"}), "max_tokens": 9999}
        ),
        "remote url": dict(json={"messages": message(image_part("https://example.com/cat.png"))}),
        "empty prompt": dict(json={"messages": [{"role": "user", "content": ""}]}),
        "prompt too long": dict(json={"messages": [{"role": "user", "content": "red blue " * 1500}]}),
        "empty stop string": dict(json={"messages": message({"type": "text", "text": "hi"}), "stop": ""}),
        "seed of 2**64": dict(json={"messages": message({"type": "text", "text": "hi"}), "seed": 2**64}),
        "lone surrogate": dict(
            content=b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
            headers={"content-type": "application/json"},
        ),
        "infinite ret_scale_factor": dict(
            content=b'{"messages": [{"role": "user", "content": "hi"}], "ret_scale_factor": Infinity}',
            headers={"content-type": "application/json"},
        ),
        "text/plain body": dict(
            content=b'{"messages": [{"role": "user", "content": "hi"}]}',
            headers={"content-type": "text/plain"},
        ),
    }
    if case == "no such image":
        reply = client.get("/v1/images/999999")
    else:
        reply = client.post(post, **requests[case])
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert words in error["message"], error
    assert "Traceback" not in reply.text


def test_api_key_is_required_when_configured(bot):  # noqa: F811
    fromage, _ = bot
    locked = TestClient(create_app(fromage, ServeConfig(api_key="sesame")))
    assert locked.get("/v1/models").status_code == 401
    assert locked.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
    assert locked.get("/health").status_code == 200  # health stays open for probes


def test_the_openai_client_reads_plain_and_streamed_completions(bot):  # noqa: F811
    fromage, _ = bot
    with running(app_config(create_app(fromage), "error")) as port:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60
        )
        content = [
            {"type": "text", "text": "a red"},
            {"type": "image_url", "image_url": {"url": data_url(RED)}},
        ]
        plain = client.chat.completions.create(
            model="fromage-default", messages=[{"role": "user", "content": content}], max_tokens=5
        )
        assert isinstance(plain.choices[0].message.content, str)
        assert isinstance(plain.choices[0].message.model_extra["images"], list)
        stream = client.chat.completions.create(
            model="fromage-default",
            messages=[{"role": "user", "content": content}],
            max_tokens=5,
            stream=True,
        )
        chunks = [chunk for chunk in stream if chunk.choices]
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
        assert streamed == plain.choices[0].message.content
        # Issue #16: finish_reason was always "stop". The tiny model does not end on its own
        # within 2 tokens, so both answers are cut by max_tokens: "length".
        no_images = {"max_images": 0}
        message = [{"role": "user", "content": "a red"}]
        cut = client.chat.completions.create(
            model="fromage-default", messages=message, max_tokens=2, extra_body=no_images
        )
        assert cut.choices[0].finish_reason == "length"
        cut_stream = client.chat.completions.create(
            model="fromage-default", messages=message, max_tokens=2, stream=True, extra_body=no_images
        )
        reasons = [c.choices[0].finish_reason for c in cut_stream if c.choices and c.choices[0].finish_reason]
        assert reasons == ["length"]
        # What ordinary clients send: standard parameters, a developer message, usage in the
        # stream (each was a 400, or missing, before issue #16).
        standard = client.chat.completions.create(
            model="fromage-default",
            messages=[{"role": "developer", "content": "Answer briefly."}, *message],
            max_tokens=2,
            user="someone",
            frequency_penalty=0.5,
            presence_penalty=0.1,
            logprobs=False,
            n=1,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=no_images,
        )
        last = list(standard)[-1]
        assert last.choices == [] and last.usage is not None
        assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
        assert last.usage.completion_tokens == 2  # cut by max_tokens: every token was decoded
        models = client.models.list()
        assert models.data[0].created > 0
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="fromage-default", messages=message, temperature=5)
        assert bad.value.body["param"] == "temperature" and bad.value.body["code"] == "less_than_equal"


def test_concurrent_retrievals_are_batched_and_match_one_at_a_time(bot):  # noqa: F811
    from concurrent.futures import ThreadPoolExecutor

    fromage, _ = bot
    app = create_app(fromage, ServeConfig(batch_size=8, batch_wait_ms=200))
    client = TestClient(app)
    texts = ["a red circle", "a green square", "blue", "a yellow", "red square", "circle"]
    alone = [[r.row for r in fromage.retrieve([t], k=2)] for t in texts]
    with ThreadPoolExecutor(len(texts)) as pool:
        replies = list(pool.map(lambda t: client.post("/v1/retrieve", json={"text": t, "k": 2}), texts))
    assert [[f["id"] for f in r.json()["data"]] for r in replies] == alone
    assert app.state.batchers["retrieve"].batches < len(texts)  # some requests shared a batch


def test_allow_listed_hosts_are_fetched_and_others_refused(bot):  # noqa: F811
    import http.server

    fromage, _ = bot
    buffer = io.BytesIO()
    RED.save(buffer, format="PNG")
    png = buffer.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/red.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        allowed = TestClient(create_app(fromage, ServeConfig(allowed_image_hosts=("127.0.0.1",))))
        ok = allowed.post("/v1/caption", json={"image": f"{base}/red.png", "max_tokens": 3})
        assert ok.status_code == 200, ok.text
        missing = allowed.post("/v1/caption", json={"image": f"{base}/nope.png"})
        assert missing.status_code == 400 and "answered 404" in missing.json()["error"]["message"]
        closed = TestClient(create_app(fromage)).post("/v1/caption", json={"image": f"{base}/red.png"})
        assert closed.status_code == 400 and "'127.0.0.1' is not allowed" in closed.json()["error"]["message"]
    finally:
        server.shutdown()


def test_a_stream_that_fails_midway_ends_with_an_error_event_and_done(bot, monkeypatch):  # noqa: F811
    """Issue #18 item 4: a failure after the first bytes were sent used to end the stream with
    no finish and no [DONE], so a client saw an empty answer and no error."""
    from fromage.pipeline import AnswerBatch

    fromage, _ = bot
    steps = []

    def failing(self):  # the first step gives every row a word, the second breaks
        steps.append(1)
        if len(steps) == 1:
            return [(handle, "Once") for handle in self._rows]
        raise RuntimeError("the decoder broke")

    monkeypatch.setattr(AnswerBatch, "step", failing)
    client = TestClient(create_app(fromage, ServeConfig()))
    body = {"messages": message({"type": "text", "text": "hi"}), "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        events = [line[len("data: ") :] for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]
    assert json.loads(events[1])["choices"][0]["delta"]["content"] == "Once"


@pytest.mark.parametrize("spelling", ["+1", "1_0", "%201", "1.0", "01", "-0", "１"])
def test_image_ids_have_one_spelling(client, spelling):
    """Issue #18 item 9: "+1", "1_0" and " 1" were accepted as other names of a row."""
    reply = client.get(f"/v1/images/{spelling}")
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "path.image_id" and "pattern" in error["message"]


def test_errors_do_not_show_object_reprs(client):
    garbage = "data:image/png;base64," + base64.b64encode(b"\x89PNG but not really").decode()
    reply = client.post("/v1/caption", json={"image": garbage})
    assert reply.status_code == 400
    assert "object at 0x" not in reply.text and "not a readable image" in reply.text


def test_a_relative_index_serves_the_indexed_file_and_refuses_a_changed_one(bot, tmp_path, monkeypatch):  # noqa: F811
    """Issue #18 item 6: `fromage index photos --out relidx` stored `photos/c1.png`, resolved
    later against the server's working directory: another directory's `photos/c1.png` was
    served. Paths are stored absolute now, and a file is served only with the indexed digest."""
    from fromage.apps.indexing import index_collection
    from fromage.index import ImageIndex

    fromage, _ = bot
    checkpoint = Path(fromage.index.metadata[0]["path"]).parent.parent / "run" / "checkpoint"
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    for root, color in ((here, (255, 0, 0)), (elsewhere, (0, 0, 255))):
        (root / "photos").mkdir(parents=True)
        Image.new("RGB", (16, 16), color).save(root / "photos" / "c1.png")
    monkeypatch.chdir(here)
    index_collection("photos", checkpoint, "relidx")
    index = ImageIndex.load(here / "relidx")
    assert Path(index.metadata[0]["path"]).is_absolute()
    monkeypatch.chdir(elsewhere)
    served = TestClient(create_app(type(fromage)(fromage.model, fromage.tokenizer, index), ServeConfig()))
    reply = served.get("/v1/images/0")
    assert reply.status_code == 200
    assert Image.open(io.BytesIO(reply.content)).convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    Image.new("RGB", (16, 16), (0, 255, 0)).save(here / "photos" / "c1.png")  # replaced since
    changed = served.get("/v1/images/0")
    assert changed.status_code == 404 and "changed since it was indexed" in changed.json()["error"]["message"]


def test_images_are_decoded_one_request_at_a_time(bot, monkeypatch):  # noqa: F811
    """Issue #18 item 2: image checks ran outside the model's concurrency limit, so concurrent
    requests added up their decoded images in memory."""
    from concurrent.futures import ThreadPoolExecutor

    import fromage.apps.serve.app as app_module

    fromage, _ = bot
    real = app_module.decode_data_url
    active, peak = [0], [0]

    def counting(url, max_pixels):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        try:
            return real(url, max_pixels)
        finally:
            active[0] -= 1

    monkeypatch.setattr(app_module, "decode_data_url", counting)
    client = TestClient(create_app(fromage, ServeConfig(batch_wait_ms=1)))
    with ThreadPoolExecutor(4) as pool:
        replies = list(
            pool.map(
                lambda _: client.post("/v1/caption", json={"image": data_url(RED), "max_tokens": 2}), range(4)
            )
        )
    assert [r.status_code for r in replies] == [200] * 4
    assert peak[0] == 1
