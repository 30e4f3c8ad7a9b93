"""Request bodies of the API (pydantic models; unknown fields are refused) and its errors:
`{"error": {"message", "type"}}` with a message naming the problem."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ...generate import CAPTION_TOKENS, GenerationConfig

GENERATION = GenerationConfig()
"""Request defaults are the library's generation defaults."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


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
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart | ImagePart]
    name: str | None = None


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
