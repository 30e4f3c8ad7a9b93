"""The built-in offline datasets (DESIGN §7): emoji in two drawing styles, and easy-VQA.

Emoji come from the npm packages `emoji-datasource-{google,twitter}` (fetched with `npm pack`
into the fromage cache the first time they are needed); easy-VQA from its PyPI package.

Emoji are split *by concept*: a stable hash of the name holds out a fraction of concepts that
are never trained on. Training uses the Google renderings of the other concepts; their Twitter
renderings test transfer across drawing styles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..paths import subdir
from .examples import Example

log = logging.getLogger(__name__)

EMOJI_VERSION = "16.0.0"
EMOJI_STYLES = ("google", "twitter")


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
    bucket = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 10_000
    return bucket < fraction * 10_000


def emoji_examples(style: str, split: str, heldout_fraction: float = 0.1) -> list[Example]:
    """`split`: "train" (trained concepts), "heldout" (never-trained concepts) or "all"."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"emoji split must be train, heldout or all; got {split!r}")
    image_dir = emoji_dir(style) / "img" / style / "64"
    out = []
    for concept in emoji_concepts(style):
        held = is_heldout(concept.name, heldout_fraction)
        if split == "all" or (split == "heldout") == held:
            out.append(Example(str(image_dir / concept.image), concept.name, f"emoji-{style}", concept.name))
    return out


# ---------------------------------------------------------------------------------------------
# easy-VQA

EASYVQA_COLORS = ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black")
EASYVQA_SHAPES = ("circle", "rectangle", "triangle")


@dataclass(frozen=True)
class EasyVQAImage:
    image: str
    color: str | None
    shape: str | None
    qa: tuple[tuple[str, str], ...]
    """The image's (question, answer) pairs in the dataset's order."""


def easyvqa_images(split: str) -> list[EasyVQAImage]:
    """easy-VQA images with colour and shape read off their questions (None where undetermined)."""
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
        color, shape = _infer_color_shape(pairs)
        out.append(EasyVQAImage(str(root / "images" / f"{image_id}.png"), color, shape, tuple(pairs)))
    return out


def _package_dir_easyvqa() -> Path:
    import easy_vqa

    return Path(easy_vqa.__file__).parent


def _infer_color_shape(pairs: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """Each image holds one shape of one colour; questions pin both down for most images."""
    color = shape = None
    not_colors: set[str] = set()
    not_shapes: set[str] = set()
    for question, answer in pairs:
        q = question.lower()
        if answer in EASYVQA_COLORS:
            color = answer
        elif answer in EASYVQA_SHAPES:
            shape = answer
        elif answer in ("yes", "no"):
            negated = " not " in f" {q} "
            truth = (answer == "yes") != negated
            for c in EASYVQA_COLORS:
                if f" {c} " in f" {q} ":
                    if truth:
                        color = c
                    else:
                        not_colors.add(c)
            for s in EASYVQA_SHAPES:
                if f" {s}" in f" {q}":
                    if truth:
                        shape = s
                    else:
                        not_shapes.add(s)
        # "what is the blue shape?" → the colour is in the question
        for c in EASYVQA_COLORS:
            if answer in EASYVQA_SHAPES and f"the {c} shape" in q:
                color = c
    if shape is None and len(not_shapes) == len(EASYVQA_SHAPES) - 1:
        shape = next(s for s in EASYVQA_SHAPES if s not in not_shapes)
    if color is None and len(not_colors) == len(EASYVQA_COLORS) - 1:
        color = next(c for c in EASYVQA_COLORS if c not in not_colors)
    return color, shape


def easyvqa_caption(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def easyvqa_examples(split: str, per_class: int = 0) -> list[Example]:
    """Captioned easy-VQA images ("a red circle"); images whose colour or shape is unknown are
    left out. `per_class` > 0 keeps at most that many images per caption (they are near copies)."""
    out = []
    counts: dict[str, int] = {}
    for item in easyvqa_images(split):
        if item.color is None or item.shape is None:
            continue
        caption = easyvqa_caption(item.color, item.shape)
        if per_class and counts.get(caption, 0) >= per_class:
            continue
        counts[caption] = counts.get(caption, 0) + 1
        out.append(Example(item.image, caption, "easyvqa", caption))
    return out
