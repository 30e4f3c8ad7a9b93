"""More drawing styles of the same emoji concepts, from freely licensed npm packages.

The concept list (names, categories, file names) is emoji-datasource's (builtin.py); each extra
style is an npm package whose images are matched to those concepts by code point and written
once as 64 px RGBA PNGs under the same file names (`1f34e.png`), so every style is read the
same way. Training styles are freely licensed; the Twitter renderings (emoji-datasource-twitter)
stay unseen, and sets whose images are not freely licensed (Apple, Facebook) are not used.

| style | package | licence of the images | format |
|---|---|---|---|
| `fluent-3d` | `@lobehub/fluent-emoji-3d@1.1.0` | MIT (Microsoft Fluent Emoji, packaged by LobeHub) | 256 px WebP per emoji |
| `noto` | `@iconify-json/noto@1.2.9` | Apache-2.0 (Google Noto Emoji) | SVG bodies in one JSON |
| `fluent-flat` | `@iconify-json/fluent-emoji-flat@1.2.6` | MIT (Microsoft Fluent Emoji, flat) | SVG bodies in one JSON |

SVGs are rasterised by resvg (PyPI `resvg-py`), not by hand.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..paths import subdir

log = logging.getLogger(__name__)

SIZE = 64
"""Side of the written PNGs: the size of emoji-datasource's images."""


@dataclass(frozen=True)
class StyleSource:
    package: str
    """npm `name@version`."""
    licence: str
    kind: str
    """`webp`: one file per emoji under `member`; `iconify`: `member` is an iconify icons.json."""
    member: str


EXTRA_STYLES = {
    "fluent-3d": StyleSource(
        "@lobehub/fluent-emoji-3d@1.1.0",
        "MIT (Microsoft Fluent Emoji; packaged by LobeHub)",
        "webp",
        "package/assets/",
    ),
    "noto": StyleSource("@iconify-json/noto@1.2.9", "Apache-2.0 (Google Noto Emoji)", "iconify", "package/"),
    "fluent-flat": StyleSource(
        "@iconify-json/fluent-emoji-flat@1.2.6", "MIT (Microsoft Fluent Emoji, flat)", "iconify", "package/"
    ),
}


def code_key(code: str) -> str:
    """One spelling of an emoji's code points for every package: upper case, `-` between
    code points, no variation selector FE0F (packages disagree on where they keep it)."""
    parts = code.upper().replace("_", "-").split("-")
    return "-".join(p for p in parts if p and p != "FE0F")


def style_dir(style: str, wanted: dict[str, str]) -> Path:
    """Directory of `style`'s 64 px PNGs, built once from its npm package. `wanted` maps the
    code key of each concept to the file name to write (`1f34e.png`); concepts the package
    lacks are simply absent."""
    source = EXTRA_STYLES.get(style)
    if source is None:
        raise ValueError(f"unknown emoji style {style!r}; extra styles: {', '.join(EXTRA_STYLES)}")
    version = source.package.rsplit("@", 1)[1]
    root = subdir("assets") / f"emoji-{style}-{version}" / str(SIZE)
    if (root / ".complete").exists():
        return root
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(f"npm is needed once to fetch {source.package} (apt-get install npm)")
    log.info("fetching %s with npm pack and writing %d px PNGs …", source.package, SIZE)
    partial = root.with_name(root.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [npm, "pack", source.package, "--silent"], cwd=tmp, check=True, stdout=subprocess.DEVNULL
        )
        tarball = next(Path(tmp).glob("*.tgz"))
        with tarfile.open(tarball) as tar:
            if source.kind == "webp":
                written = _write_webp(tar, source.member, wanted, partial)
            else:
                written = _write_iconify(tar, source.member, wanted, partial)
    (partial / ".complete").write_text(json.dumps({"package": source.package, "images": written}) + "\n")
    if root.exists():
        shutil.rmtree(root)
    partial.rename(root)
    log.info("%s: %d of %d concepts", style, written, len(wanted))
    return root


def _square(image: Image.Image) -> Image.Image:
    """An RGBA image fitted into SIZE × SIZE, centred on transparency (aspect kept)."""
    image = image.convert("RGBA")
    image.thumbnail((SIZE, SIZE), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    canvas.paste(image, ((SIZE - image.width) // 2, (SIZE - image.height) // 2), image)
    return canvas


def _write_webp(tar: tarfile.TarFile, member: str, wanted: dict[str, str], out: Path) -> int:
    written = 0
    for info in tar.getmembers():
        if not (info.isfile() and info.name.startswith(member) and info.name.endswith(".webp")):
            continue
        key = code_key(Path(info.name).stem)
        if key.startswith("1F3F4-E00") and not key.endswith("E007F"):
            key += "-E007F"  # subdivision flags are named without their closing tag
        name = wanted.get(key)
        if name is None:
            continue
        data = tar.extractfile(info)
        assert data is not None
        with Image.open(io.BytesIO(data.read())) as image:
            _square(image).save(out / name)
        written += 1
    return written


def _write_iconify(tar: tarfile.TarFile, member: str, wanted: dict[str, str], out: Path) -> int:
    import resvg_py

    def read(name: str) -> dict:
        data = tar.extractfile(member + name)
        assert data is not None
        return json.loads(data.read())

    icons, chars = read("icons.json"), read("chars.json")
    aliases = icons.get("aliases", {})
    written = 0
    for code, icon_name in chars.items():
        name = wanted.get(code_key(code))
        icon_name = aliases.get(icon_name, {}).get("parent", icon_name)
        icon = icons["icons"].get(icon_name)
        if name is None or icon is None:
            continue
        width, height = icon.get("width", icons.get("width", 16)), icon.get("height", icons.get("height", 16))
        svg = f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}">{icon["body"]}</svg>'
        side = SIZE * 4  # rendered larger, then fitted: keeps thin strokes smooth
        png = bytes(resvg_py.svg_to_bytes(svg_string=svg, width=side, height=side))
        with Image.open(io.BytesIO(png)) as image:
            _square(image).save(out / name)
        written += 1
    return written
