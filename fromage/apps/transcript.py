"""A conversation as one self-contained HTML file: text escaped, images inlined as PNG data URIs
(thumbnails), retrieved images captioned with their score and source path."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

from PIL import Image

from ..data.images import load_image
from ..fileio import atomic_write_bytes
from ..pipeline import RetrievedImage

Item: TypeAlias = str | Path | Image.Image | RetrievedImage
"""One piece of a turn: text, an image the user gave, or an image the model retrieved."""


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    items: list[Item] = field(default_factory=list)


THUMBNAIL = 160

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; color: #222; }
.turn { margin: 0.8rem 0; padding: 0.6rem 0.9rem; border-radius: 0.6rem; }
.user { background: #eef3fb; } .assistant { background: #f5f5f0; }
.role { font-size: 0.75rem; text-transform: uppercase; color: #777; }
figure { display: inline-block; margin: 0.3rem; text-align: center; vertical-align: top; }
figcaption { font-size: 0.75rem; color: #555; max-width: 10rem; overflow-wrap: anywhere; }
img { max-width: 160px; max-height: 160px; border: 1px solid #ddd; background: white; }
"""


def data_uri(image: Image.Image) -> str:
    thumb = image.copy()
    thumb.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _item_html(item: Item) -> str:
    if isinstance(item, str):
        return f"<span>{html.escape(item)}</span>"
    if isinstance(item, RetrievedImage):
        label = f"{item.caption or Path(item.path).name} · {item.score:.2f}"
        image = load_image(item.path)
        title = html.escape(item.path)
    else:
        label = item.name if isinstance(item, Path) else "image"
        image = load_image(item)
        title = html.escape(str(item)) if isinstance(item, Path) else "image"
    return (
        f'<figure><img src="{data_uri(image)}" title="{title}" alt="{html.escape(label)}">'
        f"<figcaption>{html.escape(label)}</figcaption></figure>"
    )


def to_html(turns: Sequence[Turn], title: str = "fromage conversation") -> str:
    body = []
    for turn in turns:
        items = "\n".join(_item_html(item) for item in turn.items) or "<em>(no answer)</em>"
        body.append(
            f'<div class="turn {html.escape(turn.role)}"><div class="role">{html.escape(turn.role)}</div>'
            f"\n{items}\n</div>"
        )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def save_html(turns: Sequence[Turn], path: str | Path, title: str = "fromage conversation") -> Path:
    """Write the transcript atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, to_html(turns, title).encode("utf-8"))
    path.chmod(0o644)  # a document to open and share, not a private temp file
    return path
