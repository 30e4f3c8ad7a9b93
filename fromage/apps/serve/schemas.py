"""Request bodies of the API (pydantic models; unknown fields are refused) and its errors:
`{"error": {"message", "type", "param", "code"}}` with a message naming the problem, as OpenAI's
API writes them.

Chat completions take OpenAI's standard parameters. Honoured: `messages` (roles `system`,
`developer`, `user`, `assistant`), `max_tokens` / `max_completion_tokens`, `temperature`,
`top_p`, `stop`, `seed`, `n` (1), `stream`, `stream_options.include_usage`. Accepted and
ignored (`IGNORED_PARAMETERS`): they change nothing here, and refusing them would break
ordinary clients that send them by default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ...generate import CAPTION_TOKENS, GenerationConfig

GENERATION = GenerationConfig()
"""Request defaults are the library's generation defaults."""


IGNORED_PARAMETERS = (
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "user",
    "metadata",
    "store",
    "service_tier",
    "response_format",
    "parallel_tool_calls",
    "modalities",
    "reasoning_effort",
    "prediction",
)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    error = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status)


def first_error_field(errors: Any) -> tuple[str | None, str | None]:
    """(param, code) of pydantic's first error: the field's dotted path and the error type."""
    for e in list(errors)[:1]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        return where or None, e.get("type") or None
    return None, None


def describe_errors(errors: Any) -> str:
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


def _unicode(text: str) -> str:
    """JSON can carry a lone surrogate ("\\ud800"), which no tokenizer or UTF-8 writer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
StopString = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_unicode)]


class _Strict(BaseModel):
    # Infinity and NaN parse as JSON numbers here; no setting of this API takes them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart | ImagePart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False
    """Send a last chunk with the token counts (empty `choices`)."""


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=GENERATION.temperature, ge=0.0, le=2.0)
    top_p: float = Field(default=GENERATION.top_p, gt=0.0, le=1.0)
    stream: bool = False
    stop: StopString | list[StopString] | None = Field(default=None, max_length=4)
    n: int = Field(default=1, ge=1, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    """Any 64-bit seed, signed or not (the generator takes it modulo 2**64)."""
    # fromage extensions (OpenAI clients send them with `extra_body`)
    stream_options: StreamOptions | None = None
    # Accepted and ignored (IGNORED_PARAMETERS).
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None
    prediction: dict[str, Any] | None = None
    ret_scale_factor: float = Field(default=GENERATION.ret_scale_factor, ge=0.0)
    max_images: int = Field(default=GENERATION.images_per_ret, ge=0, le=8)


class RetrieveRequest(_Strict):
    text: Text = ""
    images: list[str] = Field(default_factory=list)
    """data: URLs"""
    k: int = Field(default=3, ge=1, le=100)


class CaptionRequest(_Strict):
    image: str
    """A data: URL."""
    max_tokens: int = Field(default=CAPTION_TOKENS, ge=1)
