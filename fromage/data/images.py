"""Image decoding shared by training, indexing and inference: one rule for every path.

Transparent images are composited on white (emoji are drawn on transparency; on black their
features match across styles far worse). Decoding errors become `ImageError` naming the file.
A path may also name an image inside a webdataset tar shard, `shard.tar#member` (data/shards.py).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TypeAlias

from PIL import Image, ImageOps, UnidentifiedImageError

from .shards import read_member, split_tar_ref

ImageLike: TypeAlias = str | os.PathLike | Image.Image

# Decompression bombs: refuse images above this many pixels (PIL's own check warns at ~89M).
MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """An image that cannot be used; the message names it and says why."""


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB on a white background, whatever the mode (palette, LA, RGBA, CMYK, 16-bit, …)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything to white.
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        peak = float(array.max()) or 1.0
        image = Image.fromarray(np.rint(array * (255.0 / peak)).astype("uint8"), mode="L")
    return image.convert("RGB")


def upright(image: Image.Image) -> Image.Image:
    """The picture as it is meant to be seen: a phone photo stores its pixels sideways and says
    so in its EXIF orientation tag (images without the tag are returned as they are)."""
    return ImageOps.exif_transpose(image) or image


def load_image(source: ImageLike) -> Image.Image:
    """Decode a path or tar reference (or pass a PIL image through) as RGB; raise `ImageError`
    naming the file."""
    if isinstance(source, Image.Image):
        if source.width * source.height > MAX_PIXELS:
            raise ImageError(f"image has {source.width * source.height} pixels, limit {MAX_PIXELS}")
        return to_rgb(upright(source))
    path = Path(source)
    member = split_tar_ref(source)
    try:
        # A shard member is read whole (images are small); a plain file is opened lazily.
        with Image.open(io.BytesIO(read_member(*member)) if member else path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(
                    f"{path}: {image.width}x{image.height} = {image.width * image.height} pixels, "
                    f"limit {MAX_PIXELS}"
                )
            image.seek(0)  # first frame of animations
            image.load()
            return to_rgb(upright(image))
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: no such file" if member is None else str(exc)) from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{path}: cannot decode image ({exc})") from None
