"""The FastAPI app: routes over one `Fromage` pipeline, and `serve` (uvicorn)."""

from __future__ import annotations

import json
import mimetypes
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...config import ServeConfig
from ...data.shards import read_member, split_tar_ref
from ...pipeline import Fromage, PromptItem, RetrievedImage
from .batching import MicroBatcher, caption_jobs
from .connections import guarded_protocol
from .files import VerifiedFiles
from .images import decode_data_url, fetch_allowed
from .middleware import BodyLimit
from .scheduler import ChatScheduler
from .schemas import (
    ApiError,
    CaptionRequest,
    ChatRequest,
    Message,
    RetrieveRequest,
    TextPart,
    describe_errors,
    error_response,
    first_error_field,
)
from .streaming import AsyncPieces, BlockingPieces, stream_error


def create_app(bot: Fromage, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    app = FastAPI(title="fromage", description=__doc__.split("\n\n")[0] if __doc__ else "")
    lock = threading.Lock()
    verified = VerifiedFiles()
    started = int(time.time())
    retrieve_queue = MicroBatcher(
        lambda jobs: bot.retrieve_batch([p for p, _ in jobs], k=max(k for _, k in jobs)),
        lock,
        config.batch_size,
        config.batch_wait_ms,
    )
    caption_queue = MicroBatcher(
        lambda jobs: caption_jobs(bot, jobs), lock, config.batch_size, config.batch_wait_ms
    )
    # Retrievals ride along with the decoding steps when both kinds are batched.
    reads = config.batch_size if config.batch_size > 1 and config.chat_batch_size > 1 else 0
    chats = ChatScheduler(bot, lock, config.chat_batch_size, max_reads=reads)
    app.state.batchers = {"retrieve": retrieve_queue, "caption": caption_queue}
    app.state.chats = chats
    app.add_middleware(
        BodyLimit,  # type: ignore[arg-type]
        limit=config.max_body_bytes,
        timeout_s=config.body_timeout_s,
    )

    @app.exception_handler(ApiError)
    async def _apierror_response(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, error.kind, error.param, error.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        param, code = first_error_field(error.errors())
        return error_response(400, describe_errors(error.errors()), param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(
            error.status_code, str(error.detail), "not_found" if error.status_code == 404 else "http"
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:  # never a stack trace
        return error_response(500, "internal error", "server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if config.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {config.api_key}":
                return error_response(
                    401, "missing or wrong API key (Authorization: Bearer …)", "authentication_error"
                )
        return await call_next(request)

    def decode_image(url: str) -> Image.Image:
        if url.startswith(("http://", "https://")):
            url = fetch_allowed(url, config)  # waits on another server: never under the lock
        # Decoding is bounded like the model's work: one request's pixels at a time, so many
        # concurrent images cannot add up their decoded sizes in memory.
        with lock:
            return decode_data_url(url, config.max_image_pixels)

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
        tokens = bot.count_tokens(prompt)  # the images are encoded once, when the prompt is decoded
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
        model = {"id": config.model_id, "object": "model", "created": started, "owned_by": "fromage"}
        return {"object": "list", "data": [model]}

    @app.get("/v1/images/{image_id}", response_model=None)
    def image(image_id: Annotated[str, PathParam(pattern=ROW_ID)]) -> FileResponse | Response:
        # Only the plain decimal spelling names a row (the pattern, checked before this runs):
        # "+1", "1_0", " 1" or "01" are not other names of row 1, as int() would have them.
        row = int(image_id)
        if bot.index is None or not 0 <= row < len(bot.index):
            raise ApiError(404, f"no image {row} in the index", "not_found")
        return _indexed_image(bot, row)

    def _indexed_image(bot: Fromage, image_id: int) -> FileResponse | Response:
        assert bot.index is not None
        row = bot.index.metadata[image_id]
        path = row["path"]
        member = split_tar_ref(path)
        if member is None:
            if not Path(path).is_file():
                raise ApiError(404, f"image {image_id} is in the index but its file is gone", "not_found")
            # What is sent must be what was indexed: a relative path read from another
            # directory, or a file replaced since, would be another picture.
            if not verified.matches(path, row.get("digest")):
                raise ApiError(404, f"image {image_id}'s file changed since it was indexed", "not_found")
            return FileResponse(path)
        # An image inside a webdataset shard (`shard.tar#key.jpg`): its bytes, typed by suffix.
        try:
            data = read_member(*member)
        except OSError as exc:  # the reason without the server's paths
            why = type(exc).__name__ if not isinstance(exc, KeyError | FileNotFoundError) else "missing"
            raise ApiError(
                404, f"image {image_id} is in the index but unreadable ({why})", "not_found"
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
        if chats.max_reads:
            found = chats.retrieve(prompt, body.k)
        else:
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
        max_tokens = body.max_completion_tokens or body.max_tokens or config.default_max_tokens
        if max_tokens > config.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {max_tokens}, limit {config.max_tokens_limit}")
        prompt = prompt_of(body.messages)
        prompt_tokens = check_prompt(prompt)
        if bot.max_positions is not None and prompt_tokens + max_tokens > bot.max_positions:
            raise ApiError(
                400,
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) is more than the "
                f"model's context of {bot.max_positions}",
                param="max_tokens",
            )
        settings: dict[str, Any] = {
            "max_new_tokens": max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "ret_scale_factor": body.ret_scale_factor,
            "max_rets": 1 if body.max_images else 0,
            "images_per_ret": max(body.max_images, 1),
            "stop": tuple([body.stop] if isinstance(body.stop, str) else body.stop or ()),
        }
        seed = None if body.seed is None else body.seed % 2**64
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model_id = config.model_id
        if body.stream:

            def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
                data = {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
                return f"data: {json.dumps(data)}\n\n"

            async def events() -> AsyncIterator[str]:
                # The scheduler decodes this answer in its batch and hands pieces over; this
                # generator only forwards them. A client that goes away cancels the job, and
                # it leaves the batch at the next step: nothing waits on a client.
                pieces = AsyncPieces()
                job = chats.submit(prompt, settings, seed, pieces.emit)
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    async for piece in pieces:
                        if isinstance(piece, str):
                            yield chunk({"content": piece})
                        else:
                            yield chunk({"content": "", "images": [image_json(i) for i in piece]})
                    ending = pieces.ending
                    yield chunk({}, ending.reason if ending else "stop")
                    if body.stream_options is not None and body.stream_options.include_usage:
                        usage = _usage(prompt_tokens, ending.tokens if ending else 0)
                        last = {"id": completion_id, "object": "chat.completion.chunk", "created": created}
                        yield f"data: {json.dumps({**last, 'model': model_id, 'choices': [], 'usage': usage})}\n\n"
                except Exception as error:  # a stream that fails mid-way says so, then ends
                    yield f"data: {json.dumps(stream_error(error))}\n\n"
                finally:
                    job.cancel()
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        collected = BlockingPieces()
        chats.submit(prompt, settings, seed, collected.emit)
        answer: list[str | RetrievedImage] = []
        for piece in collected:
            answer.extend([piece] if isinstance(piece, str) else piece)
        ending = collected.ending
        assert ending is not None
        text = "".join(p for p in answer if isinstance(p, str))
        images = [image_json(p) for p in answer if isinstance(p, RetrievedImage)]
        completion = ending.tokens  # what was decoded, `[RET]`s included
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "images": images},
                    "finish_reason": ending.reason,
                }
            ],
            "usage": _usage(prompt_tokens, completion),
        }

    return app


ROW_ID = r"^(0|[1-9][0-9]{0,11})$"
"""An image id: a row number in plain decimal."""


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_threads(config: ServeConfig) -> int:
    """The products' thread count `serve` sets (process-wide): `config.threads`, or one fewer
    than the CPUs this process may run on."""
    if config.threads < 0:
        raise ValueError(f"threads must be 0 (automatic) or positive, got {config.threads}")
    return config.threads or max(1, len(os.sched_getaffinity(0)) - 1)


def server_config(
    bot: Fromage, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
) -> Any:
    """The uvicorn configuration `serve` runs: the app, the connection limits and the guarded
    protocol (connections.py). Tests and benchmarks start the same server with it."""
    import uvicorn

    torch.set_num_threads(model_threads(config))
    return uvicorn.Config(
        create_app(bot, config),
        host=host,
        port=port,
        log_level=log_level,
        limit_concurrency=config.max_connections,
        http=guarded_protocol(config.head_timeout_s, config.max_connections_per_client),
    )


def serve(
    checkpoint: str | Path,
    index: str | Path | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServeConfig | None = None,
) -> None:
    import uvicorn

    config = config or ServeConfig()
    bot = Fromage.from_pretrained(checkpoint, index=index, lm_weights=config.lm_weights)
    uvicorn.Server(server_config(bot, config, host, port)).run()
