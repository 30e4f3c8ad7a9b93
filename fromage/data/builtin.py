"""The built-in offline datasets (DESIGN §7): emoji in two drawing styles, and easy-VQA.

Emoji come from the npm packages `emoji-datasource-{google,twitter}` (fetched with `npm pack`
into the fromage cache the first time they are needed); easy-VQA from its PyPI package.

Emoji are split *by concept*: a stable hash of the name holds out a fraction of concepts that
are never trained on. Training uses the Google renderings of the other concepts; their Twitter
renderings test transfer across drawing styles.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..fileio import stable_bucket
from ..paths import subdir
from .emoji_styles import EXTRA_STYLES, code_key, style_dir
from .examples import Example

log = logging.getLogger(__name__)

EMOJI_VERSION = "16.0.0"
EMOJI_STYLES = ("google", "twitter")
"""Styles of emoji-datasource (its concept list is the Google one)."""
ALL_STYLES = (*EMOJI_STYLES, *EXTRA_STYLES)
TRAINING_STYLES = ("google", *EXTRA_STYLES)
"""Freely licensed styles the ship recipe trains on; Twitter stays unseen."""


@dataclass(frozen=True)
class EmojiConcept:
    name: str
    """Caption: the Unicode name, lower-cased ("red apple")."""
    image: str
    """File name of the 64 px PNG inside each style's directory."""
    category: str
    subcategory: str


def emoji_dir(style: str) -> Path:
    """Directory of `emoji.json` and `img/<style>/64/` for a style, fetching it once with npm."""
    if style not in EMOJI_STYLES:
        raise ValueError(f"emoji style must be one of {', '.join(EMOJI_STYLES)}; got {style!r}")
    root = subdir("assets") / f"emoji-datasource-{style}-{EMOJI_VERSION}"
    if (root / "emoji.json").exists() and (root / "img" / style / "64").is_dir():
        return root
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("npm is needed once to fetch the emoji images (apt-get install npm)")
    log.info("fetching emoji-datasource-%s@%s with npm pack …", style, EMOJI_VERSION)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [npm, "pack", f"emoji-datasource-{style}@{EMOJI_VERSION}", "--silent"],
            cwd=tmp,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        tarball = next(Path(tmp).glob("*.tgz"))
        staging = Path(tmp) / "out"
        wanted = ("package/emoji.json", f"package/img/{style}/64/")
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(wanted) and m.isfile()]
            tar.extractall(staging, members=members, filter="data")
        partial = root.with_name(root.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        shutil.move(str(staging / "package"), partial)
        if root.exists():
            shutil.rmtree(root)
        partial.rename(root)
    return root


def emoji_concepts(style: str = "google") -> list[EmojiConcept]:
    """Every base emoji (no skin-tone variants) with an image in `style`, unique by name."""
    root = emoji_dir(style)
    entries = json.loads((root / "emoji.json").read_text())
    seen: set[str] = set()
    concepts = []
    for entry in sorted(entries, key=lambda e: e["sort_order"]):
        if not entry.get(f"has_img_{style}"):
            continue
        name = (entry.get("name") or entry.get("short_name") or "").strip().lower()
        if not name or name in seen:
            continue
        seen.add(name)
        concepts.append(EmojiConcept(name, entry["image"], entry["category"], entry.get("subcategory", "")))
    return concepts


def is_heldout(name: str, fraction: float) -> bool:
    """Stable concept split: the same names are held out on every machine and run."""
    return stable_bucket(name) < fraction * 10_000


def is_story_training_family(word: str) -> bool:
    """Emoji families (names sharing their last word: "red heart", "blue heart") split in two:
    training stories use these, the offline benchmark's stories the others."""
    return stable_bucket("family:" + word) < 5_000


def style_images(style: str) -> Path:
    """Directory of a style's 64 px images, named like emoji-datasource's (`1f34e.png`)."""
    if style in EMOJI_STYLES:
        return emoji_dir(style) / "img" / style / "64"
    if style not in EXTRA_STYLES:
        raise ValueError(f"emoji style must be one of {', '.join(ALL_STYLES)}; got {style!r}")
    wanted = {code_key(Path(c.image).stem): c.image for c in emoji_concepts("google")}
    return style_dir(style, wanted)


def emoji_examples(style: str, split: str, heldout_fraction: float = 0.1) -> list[Example]:
    """`split`: "train" (trained concepts), "heldout" (never-trained concepts) or "all".
    Extra styles (emoji_styles.py) hold the Google concepts their package draws."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"emoji split must be train, heldout or all; got {split!r}")
    image_dir = style_images(style)
    extra = style in EXTRA_STYLES
    out = []
    for concept in emoji_concepts("google" if extra else style):
        held = is_heldout(concept.name, heldout_fraction)
        path = image_dir / concept.image
        if extra and not path.exists():
            continue
        if split == "all" or (split == "heldout") == held:
            out.append(Example(str(path), concept.name, f"emoji-{style}", concept.name))
    return out


# ---------------------------------------------------------------------------------------------
# easy-VQA

EASYVQA_COLORS = ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black")
EASYVQA_SHAPES = ("circle", "rectangle", "triangle")
EASYVQA_ANSWERS = (*EASYVQA_COLORS, *EASYVQA_SHAPES, "yes", "no")
"""Every answer easy-VQA uses (13)."""

# The generator draws each shape in one exact RGB value (checked on all 5,000 images).
_PALETTE = {
    (255, 0, 0): "red",
    (0, 255, 0): "green",
    (0, 0, 255): "blue",
    (255, 255, 0): "yellow",
    (0, 128, 128): "teal",
    (165, 42, 42): "brown",
    (128, 128, 128): "gray",
    (0, 0, 0): "black",
}


@dataclass(frozen=True)
class EasyVQAImage:
    image: str
    color: str
    shape: str
    qa: tuple[tuple[str, str], ...]
    """The image's (question, answer) pairs in the dataset's order."""


@dataclass(frozen=True)
class QAFacts:
    """What one answered question says about the image."""

    color: str | None = None
    """The colour it asserts ("what color is the shape? red", "is there a red shape? yes")."""
    shape: str | None = None
    not_color: str | None = None
    """A colour it rules out ("is there a red shape? no")."""
    not_shape: str | None = None


def qa_facts(question: str, answer: str) -> QAFacts:
    """Parse one easy-VQA question/answer pair. Negated forms are "… not …" and "is no …"."""
    q = f" {question.lower().rstrip('?')} "
    color = next((c for c in EASYVQA_COLORS if f" {c} " in q), None)
    shape = next((s for s in EASYVQA_SHAPES if f" {s} " in q), None)
    if answer in EASYVQA_COLORS:  # "what color is the circle?" names the shape too
        return QAFacts(color=answer, shape=shape)
    if answer in EASYVQA_SHAPES:  # "what is the red shape?" names the colour too
        return QAFacts(color=color, shape=answer)
    if answer not in ("yes", "no"):
        raise ValueError(f"unknown easy-VQA answer {answer!r} to {question!r}")
    negated = " not " in q or q.startswith(" is no ")
    present = (answer == "yes") != negated
    if present:
        return QAFacts(color=color, shape=shape)
    return QAFacts(not_color=color, not_shape=shape)


def determined_by(pairs: Sequence[tuple[str, str]]) -> tuple[str | None, str | None]:
    """(colour, shape) that the answers pin down; None where they leave it open."""
    colors = set(EASYVQA_COLORS)
    shapes = set(EASYVQA_SHAPES)
    for question, answer in pairs:
        facts = qa_facts(question, answer)
        if facts.color:
            colors &= {facts.color}
        if facts.shape:
            shapes &= {facts.shape}
        colors.discard(facts.not_color or "")
        shapes.discard(facts.not_shape or "")
    return (
        next(iter(colors)) if len(colors) == 1 else None,
        next(iter(shapes)) if len(shapes) == 1 else None,
    )


def pixel_color_shape(path: str | Path) -> tuple[str, str]:
    """Colour and shape read off an easy-VQA image: the shape is drawn in one palette colour;
    the share of its bounding box it fills tells the shape (rectangle ~1, circle ~0.79,
    triangle ~0.5; the boundaries 0.955 and 0.725 separate every question-labelled image)."""
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB")).astype(int)  # (H, W, 3)
    palette = np.array(list(_PALETTE))  # (8, 3)
    counts = (image[:, :, None, :] == palette).all(-1).sum((0, 1))  # (8,) exact matches
    if counts.max() == 0:
        raise ValueError(f"{path}: no easy-VQA palette colour in the image")
    best = int(counts.argmax())
    # Antialiased edges blend towards the background: count pixels close to the colour.
    near = np.abs(image - palette[best]).sum(-1) < 60  # (H, W)
    ys, xs = np.nonzero(near)
    fill = near.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "rectangle" if fill > 0.955 else "circle" if fill > 0.725 else "triangle"
    return list(_PALETTE.values())[best], shape


def easyvqa_images(split: str) -> list[EasyVQAImage]:
    """easy-VQA images with their colour and shape: from the questions where they pin them
    down, otherwise from the pixels (about 11% of images)."""
    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA split must be train or test; got {split!r}")
    root = _package_dir_easyvqa() / "data" / split
    questions = json.loads((root / "questions.json").read_text())
    qa: dict[int, list[tuple[str, str]]] = {}
    for question, answer, image_id in questions:
        qa.setdefault(int(image_id), []).append((question, answer))
    out = []
    for image_id in sorted(qa):
        pairs = qa[image_id]
        path = str(root / "images" / f"{image_id}.png")
        color, shape = determined_by(pairs)
        if color is None or shape is None:
            seen_color, seen_shape = pixel_color_shape(path)
            color, shape = color or seen_color, shape or seen_shape
        out.append(EasyVQAImage(path, color, shape, tuple(pairs)))
    return out


def _package_dir_easyvqa() -> Path:
    import easy_vqa

    return Path(easy_vqa.__file__).parent


def easyvqa_caption(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def easyvqa_examples(split: str, per_class: int = 0) -> list[Example]:
    """Captioned easy-VQA images ("a red circle"). `per_class` > 0 keeps at most that many
    images per caption (they are near copies)."""
    out = []
    counts: dict[str, int] = {}
    for item in easyvqa_images(split):
        caption = easyvqa_caption(item.color, item.shape)
        if per_class and counts.get(caption, 0) >= per_class:
            continue
        counts[caption] = counts.get(caption, 0) + 1
        out.append(Example(item.image, caption, "easyvqa", caption, item.qa))
    return out
