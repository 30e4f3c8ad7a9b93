"""`fromage demo`: the shipped default model in a scripted, interleaved conversation.

It builds (or reuses) the Google emoji index for the checkpoint, then: captions a real photo
from `skimage.data`, answers text requests with retrieved emoji (each checked against the emoji
it should find), and answers a prompt holding two images. The transcript is printed and
written as HTML with the images inlined.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..checkpoint import SHIPPED
from ..config import ChatConfig
from ..paths import home as fromage_home
from ..pipeline import Fromage, RetrievedImage
from .chat import Conversation, Turn

# (request, the emoji name it should retrieve)
REQUESTS = (
    ("show me a red apple", "red apple"),
    ("find me a banana", "banana"),
    ("show me a birthday cake", "birthday cake"),
)
# The chat's settings, with short answers: each request's image comes right after it (the
# recipe trains `[RET]` there), and the script checks only the image.
CHAT = ChatConfig(max_new_tokens=12)


@dataclass
class DemoReport:
    transcript: list[Turn]
    html: Path
    correct: int
    requests: int
    seconds: float


def skimage_photo(name: str = "chelsea") -> Path:
    """A real photo from scikit-image's bundled data, saved once as PNG under FROMAGE_HOME."""
    import skimage.data
    from PIL import Image

    path = fromage_home() / "photos" / f"{name}.png"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.png")
        Image.fromarray(getattr(skimage.data, name)()).save(tmp)
        tmp.replace(path)
    return path


def emoji_image(style: str, name: str) -> Path:
    from ..data.builtin import emoji_concepts, emoji_dir

    for concept in emoji_concepts(style):
        if concept.name == name:
            return emoji_dir(style) / "img" / style / "64" / concept.image
    raise KeyError(f"no {style} emoji named {name!r}")


def emoji_index(checkpoint: str | Path, index_dir: str | Path | None = None, echo=print) -> Path:
    """Build (or bring up to date) the Google emoji index for a checkpoint; default location
    under FROMAGE_HOME, one per checkpoint."""
    from ..checkpoint import checkpoint_digest
    from .indexing import index_collection

    if index_dir is None:
        index_dir = fromage_home() / "indexes" / f"emoji-google-{checkpoint_digest(checkpoint)[:12]}"
    report = index_collection("emoji-google", checkpoint, index_dir)
    echo(f"[index] {index_dir}: {report.total} emoji ({report.added} added, {report.seconds:.1f} s)")
    return Path(index_dir)


def run_demo(
    checkpoint: str | Path | None = None,
    index_dir: str | Path | None = None,
    html_path: str | Path = "demo_transcript.html",
    echo=print,
) -> DemoReport:
    start = time.time()
    checkpoint = checkpoint or SHIPPED
    index_dir = emoji_index(checkpoint, index_dir, echo)
    bot = Fromage.from_pretrained(checkpoint, index=index_dir)
    chat = Conversation(bot, **asdict(CHAT))

    def show(role: str, items) -> None:
        parts = []
        for item in items:
            if isinstance(item, RetrievedImage):
                parts.append(f"[image {item.path} | {item.caption} | score {item.score:.2f}]")
            elif isinstance(item, Path):
                parts.append(f"[image {item}]")
            else:
                parts.append(str(item).strip())
        echo(f"{role:>9}: " + " ".join(p for p in parts if p))

    # 1. Caption a real photo.
    photo = skimage_photo("chelsea")
    user = [photo, "Describe this photo."]
    # Captioning is not learned by the 14-minute CPU recipe (BENCHMARKS.md): expect noise.
    caption = " ".join(bot.caption(photo, min_new_tokens=4).split())
    chat.add("user", list(user))
    chat.add("assistant", [caption])
    show("user", user)
    show("fromage", [caption])

    # 2. Text requests answered with retrieved images.
    correct = 0
    for request, expected in REQUESTS:
        answer = list(chat.ask([request]))
        images = [img for piece in answer if isinstance(piece, list) for img in piece]
        ok = bool(images) and images[0].caption == expected
        correct += ok
        show("user", [request])
        show("fromage", chat.turns[-1].items)
        echo(f"{'':>9}  {'✓' if ok else '✗'} expected: {expected}")

    # 3. Two images in one prompt.
    pair = [emoji_image("twitter", "red apple"), emoji_image("twitter", "banana")]
    user = [pair[0], "and", pair[1], "show me another fruit"]
    list(chat.ask(user))
    show("user", user)
    show("fromage", chat.turns[-1].items)

    from .transcript import save_html

    html = save_html(chat.turns, html_path, title="fromage demo")
    seconds = time.time() - start
    echo(f"[demo] {correct}/{len(REQUESTS)} requests retrieved the expected emoji; {seconds:.0f} s")
    echo(f"[demo] transcript: {html}")
    return DemoReport(chat.turns, html, correct, len(REQUESTS), seconds)
