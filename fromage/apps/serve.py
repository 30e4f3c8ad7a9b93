"""`fromage serve`: an HTTP API over one `Fromage` pipeline (FastAPI; OpenAPI schema at /docs).

- `POST /v1/chat/completions`: the OpenAI chat format (content is a string or a list of `text`
  and `image_url` parts with base64 `data:` URLs). The answer's text is `message.content`, so
  OpenAI clients read it unchanged; retrieved images are listed in `message.images` (id,
  caption, score, URL under `/v1/images/{id}`). `stream: true` sends server-sent events.
- `POST /v1/retrieve`, `POST /v1/caption`, `GET /v1/images/{id}` (only images of the loaded
  index: no path from a request reaches the filesystem), `GET /health`, `GET /v1/models`.

Bad input gets a 4xx JSON error `{"error": {"message", "type"}}` naming the problem; the
limits are `ServeConfig` fields. The model is never asked for two forward passes at once:
every model call holds one lock, and concurrent `/v1/retrieve` and `/v1/caption` requests are
queued and run as one batch (up to `batch_size`, after waiting at most `batch_wait_ms` for
company).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import mimetypes
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.images import ImageError, load_image
from ..data.shards import read_member, split_tar_ref
from ..pipeline import Fromage, PromptItem, RetrievedImage


@dataclass
class ServeConfig:
    model_id: str = "fromage-default"
    max_body_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 16_000_000
    max_images_per_request: int = 4
    max_prompt_tokens: int = 1024
    max_tokens_limit: int = 256
    api_key: str = ""
    """When set, every /v1 request needs `Authorization: Bearer <api_key>`."""
    allowed_image_hosts: tuple[str, ...] = ()
    """Hosts whose http(s) image URLs are fetched; any other remote URL is refused."""
    fetch_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    """A client that has not sent its whole request body after this long gets a 408 and its
    connection is closed (slow clients cannot hold a worker forever)."""
    max_connections: int = 256
    """Concurrent connections `serve` accepts; more get a 503 at once instead of queueing."""
    batch_size: int = 16
    """Most retrieve/caption requests run together; 1 = one at a time."""
    batch_wait_ms: float = 5.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


# ---------------------------------------------------------------------------- request schemas


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart | ImagePart]
    name: str | None = None


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    seed: int | None = None
    # fromage extensions (OpenAI clients send them with `extra_body`)
    ret_scale_factor: float = Field(default=1.0, ge=0.0)
    max_images: int = Field(default=1, ge=0, le=8)


class RetrieveRequest(_Strict):
    text: str = ""
    images: list[str] = Field(default_factory=list)
    """data: URLs"""
    k: int = Field(default=3, ge=1, le=100)


class CaptionRequest(_Strict):
    image: str
    """A data: URL."""
    max_tokens: int = Field(default=24, ge=1)


# ---------------------------------------------------------------------------- the app


def create_app(bot: Fromage, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    app = FastAPI(title="fromage", description=__doc__.split("\n\n")[0] if __doc__ else "")
    lock = threading.Lock()
    retrieve_queue = MicroBatcher(
        lambda jobs: bot.retrieve_batch([p for p, _ in jobs], k=max(k for _, k in jobs)),
        lock,
        config.batch_size,
        config.batch_wait_ms,
    )
    caption_queue = MicroBatcher(
        lambda jobs: _caption_jobs(bot, jobs), lock, config.batch_size, config.batch_wait_ms
    )
    app.state.batchers = {"retrieve": retrieve_queue, "caption": caption_queue}
    app.add_middleware(
        _BodyLimit,  # type: ignore[arg-type]
        limit=config.max_body_bytes,
        timeout_s=config.body_timeout_s,
    )

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return _error(error.status, error.message, error.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return _error(400, _describe(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(
            error.status_code, str(error.detail), "not_found" if error.status_code == 404 else "http"
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:  # never a stack trace
        return _error(500, "internal error", "server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if config.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {config.api_key}":
                return _error(
                    401, "missing or wrong API key (Authorization: Bearer …)", "authentication_error"
                )
        return await call_next(request)

    def decode_image(url: str) -> Image.Image:
        if url.startswith(("http://", "https://")):
            url = _fetch_allowed(url, config)
        return _decode_data_url(url, config.max_image_pixels)

    def prompt_of(messages: list[Message]) -> list[PromptItem]:
        items: list[PromptItem] = []
        images = 0
        for message in messages:
            if items:
                items.append("\n")
            parts = (
                [TextPart(type="text", text=message.content)]
                if isinstance(message.content, str)
                else message.content
            )
            for part in parts:
                if isinstance(part, TextPart):
                    items.append(part.text)
                else:
                    images += 1
                    if images > config.max_images_per_request:
                        raise ApiError(
                            400, f"too many images: more than {config.max_images_per_request} in one request"
                        )
                    items.append(decode_image(part.image_url.url))
        return items

    def check_prompt(prompt: list[PromptItem]) -> int:
        """Refuse empty or too long prompts; returns the prompt's length in tokens."""
        if not any((isinstance(p, str) and p.strip()) or isinstance(p, Image.Image) for p in prompt):
            raise ApiError(400, "the prompt has no text and no image")
        tokens = len(bot.encode(prompt).input_ids[0])
        if tokens > config.max_prompt_tokens:
            raise ApiError(400, f"prompt is {tokens} tokens, limit {config.max_prompt_tokens}")
        return tokens

    def image_json(img: RetrievedImage) -> dict[str, Any]:
        return {
            "id": img.row,
            "caption": img.caption,
            "score": round(img.score, 4),
            "url": f"/v1/images/{img.row}",
        }

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": config.model_id,
            "images": 0 if bot.index is None else len(bot.index),
        }

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "owned_by": "fromage"}]}

    @app.get("/v1/images/{image_id}", response_model=None)
    def image(image_id: int) -> FileResponse | Response:
        if bot.index is None or not 0 <= image_id < len(bot.index):
            raise ApiError(404, f"no image {image_id} in the index", "not_found")
        path = bot.index.metadata[image_id]["path"]
        member = split_tar_ref(path)
        if member is None:
            if not Path(path).is_file():
                raise ApiError(404, f"image {image_id} is in the index but its file is gone", "not_found")
            return FileResponse(path)
        # An image inside a webdataset shard (`shard.tar#key.jpg`): its bytes, typed by suffix.
        try:
            data = read_member(*member)
        except OSError as exc:
            raise ApiError(
                404, f"image {image_id} is in the index but unreadable ({exc})", "not_found"
            ) from None
        return Response(data, media_type=mimetypes.guess_type(member[1])[0] or "application/octet-stream")

    @app.post("/v1/retrieve")
    def retrieve(body: RetrieveRequest) -> dict[str, Any]:
        if bot.index is None:
            raise ApiError(400, "the server has no image index: retrieval is unavailable")
        if len(body.images) > config.max_images_per_request:
            raise ApiError(400, f"too many images: {len(body.images)}, limit {config.max_images_per_request}")
        prompt: list[PromptItem] = [decode_image(u) for u in body.images]
        if body.text:
            prompt.append(body.text)
        check_prompt(prompt)
        found = retrieve_queue.submit((prompt, body.k))[: body.k]
        return {"object": "list", "data": [image_json(f) for f in found]}

    @app.post("/v1/caption")
    def caption(body: CaptionRequest) -> dict[str, Any]:
        if body.max_tokens > config.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {body.max_tokens}, limit {config.max_tokens_limit}")
        picture = decode_image(body.image)
        return {"caption": caption_queue.submit((picture, body.max_tokens))}

    @app.post("/v1/chat/completions", response_model=None)
    def chat(body: ChatRequest) -> dict[str, Any] | StreamingResponse:
        max_tokens = body.max_completion_tokens or body.max_tokens or 64
        if max_tokens > config.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {max_tokens}, limit {config.max_tokens_limit}")
        prompt = prompt_of(body.messages)
        prompt_tokens = check_prompt(prompt)
        settings: dict[str, Any] = {
            "max_new_tokens": max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "ret_scale_factor": body.ret_scale_factor,
            "max_rets": 1 if body.max_images else 0,
            "images_per_ret": max(body.max_images, 1),
            "stop": tuple([body.stop] if isinstance(body.stop, str) else body.stop or ()),
        }
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model_id = config.model_id
        if body.stream:

            def events() -> Iterator[str]:
                def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
                    data = {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model_id,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                    }
                    return f"data: {json.dumps(data)}\n\n"

                yield chunk({"role": "assistant", "content": ""})
                with lock:
                    for piece in bot.stream(prompt, seed=body.seed, **settings):
                        if isinstance(piece, str):
                            yield chunk({"content": piece})
                        else:
                            yield chunk({"content": "", "images": [image_json(i) for i in piece]})
                yield chunk({}, "stop")
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        with lock:
            answer = bot.generate(prompt, seed=body.seed, **settings)
        text = "".join(p for p in answer if isinstance(p, str))
        images = [image_json(p) for p in answer if isinstance(p, RetrievedImage)]
        # The answer text re-tokenised, plus the one `[RET]` that retrieved its images.
        completion = _token_count(bot, text) + (1 if images else 0)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "images": images},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
            },
        }

    return app


# ---------------------------------------------------------------------------- batching


class MicroBatcher:
    """A queue and one worker thread: callers `submit` a job and block until its result; the
    worker takes the first waiting job, gathers up to `max_batch` within `wait_ms`, and runs
    them with one `run(jobs) -> results` call while holding `lock`."""

    def __init__(
        self, run: Callable[[list[Any]], list[Any]], lock: threading.Lock, max_batch: int, wait_ms: float
    ):
        self.run, self.lock = run, lock
        self.max_batch, self.wait_s = max(1, max_batch), wait_ms / 1000
        self.jobs: queue.Queue[tuple[Any, Future]] = queue.Queue()
        self.batches = 0
        threading.Thread(target=self._loop, daemon=True, name="fromage-batcher").start()

    def submit(self, job: Any) -> Any:
        future: Future = Future()
        self.jobs.put((job, future))
        return future.result()

    def _loop(self) -> None:
        while True:
            batch = [self.jobs.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                with self.lock:
                    results = self.run([job for job, _ in batch])
            except Exception as error:  # each caller sees the failure, the worker lives on
                for _, future in batch:
                    future.set_exception(error)
                continue
            self.batches += 1
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)


def _caption_jobs(bot: Fromage, jobs: list[tuple[Image.Image, int]]) -> list[str]:
    """Jobs with the same token budget are captioned together."""
    out = [""] * len(jobs)
    for budget in {n for _, n in jobs}:
        rows = [i for i, (_, n) in enumerate(jobs) if n == budget]
        texts = bot.caption_batch([jobs[i][0] for i in rows], max_new_tokens=budget)
        for i, text in zip(rows, texts, strict=True):
            out[i] = text
    return out


# ---------------------------------------------------------------------------- helpers


def _token_count(bot: Fromage, text: str) -> int:
    return len(bot.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def _describe(errors: Any) -> str:
    """Pydantic's error list → one line naming each bad field."""
    parts = []
    for e in list(errors)[:3]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        kind = e.get("type", "")
        if kind == "json_invalid":
            return "invalid JSON body"
        if kind == "extra_forbidden":
            parts.append(f"unknown field {where!r}")
        else:
            parts.append(f"{where or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _fetch_allowed(url: str, config: ServeConfig) -> str:
    """Fetch an http(s) image from an allow-listed host (no redirects, size-capped) and return
    it as a data: URL; any other host is refused naming it."""
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host not in config.allowed_image_hosts:
        raise ApiError(
            400,
            f"remote image URLs are refused (host {host!r} is not allowed): send a base64 data: URL",
        )
    import httpx

    try:
        with httpx.stream("GET", url, timeout=config.fetch_timeout_s, follow_redirects=False) as reply:
            if reply.status_code != 200:
                raise ApiError(400, f"image_url {url}: the host answered {reply.status_code}")
            data = b""
            for chunk in reply.iter_bytes():
                data += chunk
                if len(data) > config.max_body_bytes:
                    raise ApiError(400, f"image_url {url}: larger than {config.max_body_bytes} bytes")
    except httpx.HTTPError as error:
        raise ApiError(400, f"image_url {url}: cannot fetch ({type(error).__name__})") from None
    return "data:image/unknown;base64," + base64.b64encode(data).decode("ascii")


def _decode_data_url(url: str, max_pixels: int) -> Image.Image:
    if not url.startswith("data:") or ";base64," not in url:
        raise ApiError(400, "image_url must be a data:<mime>;base64,<data> URL")
    try:
        raw = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image_url: invalid base64 data") from None
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            pixels = probe.width * probe.height
            if pixels > max_pixels:
                raise ApiError(
                    400, f"image has {probe.width}x{probe.height} = {pixels} pixels, limit {max_pixels}"
                )
            probe.load()
            return load_image(probe.copy())
    except ApiError:
        raise
    except (ImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        raise ApiError(400, f"image_url: not a readable image ({error})") from None


class _BodyLimit:
    """ASGI middleware: the request body is read here first, whole, so that bodies over `limit`
    bytes (declared or streamed) get a 413 and bodies still incomplete `timeout_s` after the
    request began get a 408, before any route runs. The limit bounds what is buffered."""

    def __init__(self, app: Any, limit: int, timeout_s: float = 30.0):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_json(send, 413, f"request body is {int(declared)} bytes, limit {self.limit}")
            return
        chunks: list[bytes] = []
        seen = 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                why = f"request body not complete after {self.timeout_s:g} s ({seen} bytes received)"
                await _send_json(send, 408, why)
                return
            if message["type"] == "http.disconnect":
                return  # the client went away; nobody to answer
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                await _send_json(send, 413, f"request body is over the limit of {self.limit} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later messages: the disconnect a streaming response waits for

        await self.app(scope, replay, send)


async def _send_json(send: Any, status: int, message: str) -> None:
    """An error answered before the request body was read whole. The connection is closed after
    it (`Connection: close`): whatever the client still sends is not a next request, and on a
    kept-alive connection uvicorn would cancel its idle timer on each late chunk and hold the
    connection open for as long as the client cares to trickle."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve(
    checkpoint: str | Path,
    index: str | Path | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServeConfig | None = None,
) -> None:
    import uvicorn

    bot = Fromage.from_pretrained(checkpoint, index=index)
    config = config or ServeConfig()
    uvicorn.run(
        create_app(bot, config),
        host=host,
        port=port,
        log_level="info",
        limit_concurrency=config.max_connections,
    )
