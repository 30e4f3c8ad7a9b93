"""Images in requests: base64 `data:` URLs decoded under a pixel limit, and http(s) URLs
fetched only from allow-listed hosts."""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image, UnidentifiedImageError

from ...config import ServeConfig
from ...data.images import ImageError, load_image
from .schemas import ApiError

_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def fetch_allowed(url: str, config: ServeConfig) -> str:
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


def decode_data_url(url: str, max_pixels: int) -> Image.Image:
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
    except UnidentifiedImageError:
        raise ApiError(400, "image_url: not a readable image (not an image format Pillow knows)") from None
    except (ImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        # Pillow's messages can name its in-memory buffer (`<_io.BytesIO object at 0x…>`).
        why = _OBJECT_REPR.sub("the image", str(error))
        raise ApiError(400, f"image_url: not a readable image ({why})") from None
