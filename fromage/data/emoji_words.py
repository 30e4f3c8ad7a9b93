"""Other words people use for an emoji: shortcodes and tags from emojibase (npm
`emojibase-data@17.0.0`, MIT), matched to emoji-datasource's concepts by code point.

Requests in the ship recipe name an emoji by its Unicode name ("red apple") and sometimes by a
shortcode ("apple"); category requests ("show me another fruit") use the concept's
subcategory. Fetched once with `npm pack` into the fromage cache, like the images.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..paths import subdir
from .emoji_styles import code_key

PACKAGE = "emojibase-data@17.0.0"
FILES = ("package/en/data.json", "package/en/shortcodes/cldr.json", "package/en/shortcodes/iamcal.json")


@dataclass(frozen=True)
class EmojiWords:
    label: str
    shortcodes: tuple[str, ...]
    """Shortcodes with `_` as spaces ("red apple", "apple"), without the label itself."""
    tags: tuple[str, ...]


def emojibase_dir() -> Path:
    root = subdir("assets") / PACKAGE.replace("@", "-")
    if all((root / f.removeprefix("package/")).exists() for f in FILES):
        return root
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(f"npm is needed once to fetch {PACKAGE} (apt-get install npm)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([npm, "pack", PACKAGE, "--silent"], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        with tarfile.open(next(Path(tmp).glob("*.tgz"))) as tar:
            tar.extractall(Path(tmp) / "out", members=[tar.getmember(f) for f in FILES], filter="data")
        partial = root.with_name(root.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        shutil.move(str(Path(tmp) / "out" / "package"), partial)
        if root.exists():
            shutil.rmtree(root)
        partial.rename(root)
    return root


@lru_cache(maxsize=1)
def emoji_words() -> dict[str, EmojiWords]:
    """Code key (emoji_styles.code_key) → the emoji's words."""
    root = emojibase_dir()
    records = json.loads((root / "en" / "data.json").read_text())
    codes: dict[str, set[str]] = {}
    for name in ("cldr.json", "iamcal.json"):
        for hexcode, value in json.loads((root / "en" / "shortcodes" / name).read_text()).items():
            codes.setdefault(hexcode, set()).update([value] if isinstance(value, str) else value)
    out = {}
    for record in records:
        label = record["label"].lower()
        words = {c.replace("_", " ").lower() for c in codes.get(record["hexcode"], ())}
        words.discard(label)
        out[code_key(record["hexcode"])] = EmojiWords(
            label, tuple(sorted(words)), tuple(t.lower() for t in record.get("tags", ()))
        )
    return out
