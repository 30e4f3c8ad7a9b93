"""`fromage demo`: the shipped default model in a scripted, multi-turn conversation that shows
each capability and checks it.

One conversation with the chat's settings (`ChatConfig`; `--memory -1` puts every earlier turn
in each prompt), over an index of the Google emoji and the easy-VQA test images. Each turn has
a check; the demo prints `N/M checks passed` and writes the transcript as HTML with the images
inlined:

1. caption an emoji in a drawing style training never saw (Twitter);
2. caption an easy-VQA test image;
3. answer a question about an easy-VQA image;
4. a request by name, after the images earlier in the conversation;
5. two images and "show me another fruit" (any fruit counts);
6. a dialogue-style request (VisDial queries), answered with an easy-VQA image;
7. a story continuation (an emoji family training never builds stories from);
and a real photo (scikit-image), captioned, which joins the transcript only if the caption is
true of it (it names a cat): the demo never shows a wrong claim about a photo.

Captions and answers are decoded from the image (and question) alone, as the captioning pass
trained them; the turns are then part of the conversation every later prompt reads.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..checkpoint import SHIPPED
from ..config import ChatConfig
from ..data.builtin import easyvqa_images, emoji_concepts, emoji_dir
from ..data.dialogues import ask, format_rounds
from ..paths import home as fromage_home
from ..pipeline import Fromage, RetrievedImage
from .chat import Conversation, Turn

# The chat's settings, with short answers: the script checks the first image of each request.
CHAT = ChatConfig(max_new_tokens=12)
PHOTO_WORDS = ("cat", "kitten")
"""What a caption of the photo (scikit-image's "chelsea", a tabby cat) must say to be true."""
STORY = ("closed book", "open book", "green book", "blue book", "orange book")
"""Family "book": the story training never builds (data/builtin.py `is_story_training_family`)."""


@dataclass
class Check:
    what: str
    expected: str
    got: str
    passed: bool


@dataclass
class DemoReport:
    transcript: list[Turn]
    html: Path
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> int:
        return sum(c.passed for c in self.checks)


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
    for concept in emoji_concepts(style):
        if concept.name == name:
            return emoji_dir(style) / "img" / style / "64" / concept.image
    raise KeyError(f"no {style} emoji named {name!r}")


def emoji_index(checkpoint: str | Path, index_dir: str | Path | None = None, echo=print) -> Path:
    """Build (or bring up to date) the Google emoji index for a checkpoint; default location
    under FROMAGE_HOME, one per checkpoint."""
    return _index(checkpoint, ("emoji-google",), "emoji-google", index_dir, echo)


def demo_index(checkpoint: str | Path, index_dir: str | Path | None = None, echo=print) -> Path:
    """The Google emoji and the easy-VQA test images in one index (dialogue requests retrieve
    easy-VQA images)."""
    return _index(checkpoint, ("emoji-google", "easyvqa-test"), "demo", index_dir, echo)


def _index(checkpoint, sources: tuple[str, ...], name: str, index_dir, echo) -> Path:
    from ..checkpoint import checkpoint_digest
    from .indexing import index_collection

    if index_dir is None:
        index_dir = fromage_home() / "indexes" / f"{name}-{checkpoint_digest(checkpoint)[:12]}"
    for source in sources:  # a grown index embeds only what it lacks
        report = index_collection(source, checkpoint, index_dir)
        echo(
            f"[index] {index_dir}: {report.total} images ({report.added} added from {source}, {report.seconds:.1f} s)"
        )
    return Path(index_dir)


def _same(caption: str, expected: str) -> bool:
    return caption.strip().lower().rstrip(".") == expected.lower()


class _Script:
    """The conversation, what it printed and the checks so far."""

    def __init__(self, bot: Fromage, echo: Callable[[str], None], chat: ChatConfig):
        self.bot = bot
        self.chat = Conversation(bot, **asdict(chat))
        self.echo = echo
        self.checks: list[Check] = []

    def show(self, role: str, items) -> None:
        parts = []
        for item in items:
            if isinstance(item, RetrievedImage):
                parts.append(f"[image {item.path} | {item.caption} | score {item.score:.2f}]")
            elif isinstance(item, Path):
                parts.append(f"[image {item}]")
            else:
                parts.append(str(item).strip())
        self.echo(f"{role:>9}: " + " ".join(p for p in parts if p))

    def check(self, what: str, expected: str, got: str, passed: bool) -> None:
        self.checks.append(Check(what, expected, got, passed))
        self.echo(f"{'':>9}  {'✓' if passed else '✗'} {what}: expected {expected}; got {got}")

    def said(self, user: list, answer: str) -> None:
        """A turn whose answer was decoded outside the chat (a caption): it joins the history."""
        self.chat.add("user", list(user))
        self.chat.add("assistant", [answer])
        self.show("user", user)
        self.show("fromage", [answer])

    def ask(self, user: list) -> list[RetrievedImage]:
        """A chat turn (the whole conversation in its prompt); → the images it retrieved."""
        for _ in self.chat.ask(user):
            pass
        self.show("user", user)
        self.show("fromage", self.chat.turns[-1].items)
        return [i for i in self.chat.turns[-1].items if isinstance(i, RetrievedImage)]


def run_demo(
    checkpoint: str | Path | None = None,
    index_dir: str | Path | None = None,
    html_path: str | Path = "demo_transcript.html",
    echo=print,
    chat: ChatConfig = CHAT,
) -> DemoReport:
    start = time.time()
    checkpoint = checkpoint or SHIPPED
    index_dir = demo_index(checkpoint, index_dir, echo)
    s = _Script(Fromage.from_pretrained(checkpoint, index=index_dir), echo, chat)
    echo(f"[demo] memory: {'every earlier turn that fits' if chat.memory == -1 else chat.memory}")
    vqa = easyvqa_images("test")

    # 1–2. Captions: an emoji drawn in an unseen style, an easy-VQA image.
    emoji = emoji_image("twitter", "dog face")
    caption = s.bot.caption(emoji)
    s.said([emoji, "What is this?"], caption)
    s.check("caption, Twitter emoji", "dog face", caption, _same(caption, "dog face"))
    shape = vqa[0]
    expected = f"a {shape.color} {shape.shape}"
    caption = s.bot.caption(Path(shape.image))
    s.said([Path(shape.image), "What is this?"], caption)
    s.check("caption, easy-VQA image", expected, caption, _same(caption, expected))

    # 3. A question about an image.
    asked = vqa[1]
    question = "what shape is in the image?"
    prompt = [Path(asked.image), ask(question)]
    pieces, _ = s.bot.complete(prompt, max_new_tokens=4, max_rets=0, stop=("\n", ".", "Q:"))
    answer = "".join(p for p in pieces if isinstance(p, str)).strip()
    s.said(prompt, answer)
    s.check("answer about an image", asked.shape, answer, answer.lower().startswith(asked.shape))

    # 4. A request after the images earlier in the conversation.
    found = s.ask(["show me a red apple"])
    got = found[0].caption if found else "no image"
    s.check("request after earlier images", "red apple", got, got == "red apple")

    # 5. Two fruits and "another fruit": any fruit the index holds counts.
    fruit = {c.name for c in emoji_concepts("google") if c.subcategory == "food-fruit"}
    pair = [emoji_image("twitter", "red apple"), emoji_image("twitter", "banana")]
    found = s.ask([pair[0], "and", pair[1], "show me another fruit"])
    got = found[0].caption if found else "no image"
    s.check("another fruit", "any fruit", got, got in fruit - {"red apple", "banana"})

    # 6. A dialogue-style request, answered with an easy-VQA image of that colour and shape.
    target = vqa[2]
    rounds = [("what color is the shape?", target.color), ("what shape is this?", target.shape)]
    found = s.ask([format_rounds(rounds)])
    wanted = f"a {target.color} {target.shape}"
    got = found[0].caption if found else "no image"
    s.check("dialogue request", wanted, got, got == wanted)

    # 7. A story: four book emoji named and shown, the fifth only by its colour.
    story: list = []
    for name in STORY[:-1]:
        story += [f"{name}.", emoji_image("google", name)]
    found = s.ask([*story, STORY[-1].split()[0]])
    got = found[0].caption if found else "no image"
    s.check("story continuation", STORY[-1], got, got == STORY[-1])

    # 8. A real photo: shown only if what the model says about it is true.
    photo = skimage_photo("chelsea")
    caption = s.bot.caption(photo, min_new_tokens=1)
    if any(w in re.findall(r"[a-z]+", caption.lower()) for w in PHOTO_WORDS):
        s.said([photo, "What is this?"], caption)
    else:  # not a check: the rule is only that a wrong claim about a photo is never shown
        s.echo(
            f"{'':>9}  (a photo is left out: its caption {' '.join(caption.split())!r} does not name a cat)"
        )

    from .transcript import save_html

    html = save_html(s.chat.turns, html_path, title="fromage demo")
    report = DemoReport(s.chat.turns, html, s.checks, time.time() - start)
    echo(f"[demo] {report.passed}/{len(report.checks)} checks passed; {report.seconds:.0f} s")
    echo(f"[demo] transcript: {html}")
    return report
