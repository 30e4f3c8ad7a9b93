"""The request guard (ASGI middleware, below every route): bodies are JSON, bounded in size
and in time."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any


class BodyLimit:
    """ASGI middleware: the request body is read here first, whole, so that bodies over `limit`
    bytes (declared or streamed) get a 413 and bodies still incomplete `timeout_s` after the
    request began get a 408, before any route runs. The limit bounds what is buffered. A body
    must be declared JSON (415 otherwise): a `text/plain` POST is a request any web page can
    send without a CORS preflight, so it must not make the server generate."""

    def __init__(self, app: Any, limit: int, timeout_s: float = 30.0):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind != b"application/json" and not kind.endswith(b"+json"):
                shown = kind.decode("latin-1") or "none"
                await _send_json(send, 415, f"Content-Type must be application/json, got {shown}")
                return
        declared = headers.get(b"content-length")
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
