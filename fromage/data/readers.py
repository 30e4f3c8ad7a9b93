"""Readers for captioned image collections, with bad input counted and reported.

- TSV as published by the original code: a header `caption<TAB>image`, then one pair per line;
  `image` is a file name relative to an image directory.
- JSONL: one `{"image": …, "caption": …}` object per line.

A malformed row or a non-UTF-8 line is reported with file and line number, counted and skipped
(never resampled); `BadInputLog.check` stops the run when the bad share exceeds the limit.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .examples import Example

log = logging.getLogger(__name__)


class TooManyBadInputs(ValueError):
    """More of the input was unreadable or malformed than the run allows."""


@dataclass
class BadInputLog:
    """Counts every kind of bad input; keeps the first messages of each kind for the report."""

    counts: Counter[str] = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)

    def add(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        if len(self.messages) < 50:
            self.messages.append(message)
        log.warning("skipped: %s", message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no bad inputs"
        kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.counts.items()))
        return f"{self.total} bad inputs skipped ({kinds})"

    def check(self, seen: int, max_fraction: float) -> None:
        """Raise when more than `max_fraction` of `seen` inputs were bad."""
        if seen and self.total / seen > max_fraction:
            first = "\n  ".join(self.messages[:10])
            raise TooManyBadInputs(
                f"{self.total} of {seen} inputs are bad ({self.total / seen:.1%} > limit "
                f"{max_fraction:.1%}); first problems:\n  {first}"
            )


def _lines(path: Path, bad: BadInputLog):
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if number == 1:  # a header (or first row) that is not UTF-8: the whole file is not
                    utf16 = raw.startswith((b"\xff\xfe", b"\xfe\xff"))
                    kind = "UTF-16 (save it as UTF-8)" if utf16 else f"not UTF-8 ({exc.reason})"
                    raise ValueError(f"{path}:1: the file is {kind}") from None
                bad.add("not utf-8", f"{path}:{number}: line is not UTF-8 ({exc.reason})")
                continue
            if number == 1:
                line = line.lstrip("\ufeff")  # byte-order mark
            yield number, line.rstrip("\r\n")


def read_tsv(path: str | Path, image_dir: str | Path | None, bad: BadInputLog) -> list[Example]:
    """The published format: header `caption<TAB>image`; extra columns are ignored by name."""
    path = Path(path)
    root = Path(image_dir) if image_dir else path.parent
    out: list[Example] = []
    columns: dict[str, int] | None = None
    for number, line in _lines(path, bad):
        if columns is None:
            header = [name.strip() for name in line.split("\t")]
            while header and not header[-1]:  # a trailing tab names no column
                header.pop()
            if "caption" not in header or "image" not in header:
                raise ValueError(f"{path}:1: header must name `caption` and `image` columns, got {header}")
            repeated = sorted({name for name in header if header.count(name) > 1})
            if repeated:
                raise ValueError(f"{path}:1: header names {', '.join(map(repr, repeated))} more than once")
            columns = {name: i for i, name in enumerate(header)}
            continue
        if not line.strip():
            continue
        cells = line.split("\t")
        while len(cells) > len(columns) and not cells[-1].strip():  # trailing tabs
            cells.pop()
        if len(cells) != len(columns):
            bad.add(
                "malformed row",
                f"{path}:{number}: expected {len(columns)} tab-separated fields, found {len(cells)}",
            )
            continue
        caption = cells[columns["caption"]].strip()
        image = cells[columns["image"]].strip()
        if not caption or not image:
            bad.add("malformed row", f"{path}:{number}: empty caption or image field")
            continue
        out.append(Example(str(root / image), caption, path.name, caption))
    if columns is None:
        raise ValueError(f"{path}: empty file (no header)")
    return out


def read_jsonl(path: str | Path, image_dir: str | Path | None, bad: BadInputLog) -> list[Example]:
    path = Path(path)
    root = Path(image_dir) if image_dir else path.parent
    out: list[Example] = []
    for number, line in _lines(path, bad):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.add("malformed row", f"{path}:{number}: invalid JSON ({exc.msg})")
            continue
        except RecursionError:  # nested deeper than the parser goes
            bad.add("malformed row", f"{path}:{number}: JSON nested too deeply")
            continue
        except ValueError as exc:  # e.g. an integer of thousands of digits
            bad.add("malformed row", f"{path}:{number}: unreadable JSON value ({str(exc)[:80]})")
            continue
        if not isinstance(row, dict):
            bad.add("malformed row", f"{path}:{number}: expected a JSON object")
            continue
        image, caption = row.get("image"), row.get("caption")
        if not isinstance(image, str) or not isinstance(caption, str) or not image or not caption.strip():
            bad.add("malformed row", f"{path}:{number}: needs string fields `image` and `caption`")
            continue
        if not (_is_unicode(image) and _is_unicode(caption)):  # JSON escapes can spell "\ud800"
            bad.add("malformed row", f"{path}:{number}: text is not valid Unicode (a lone surrogate)")
            continue
        out.append(Example(str(root / image), caption.strip(), path.name, caption.strip()))
    return out


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_collection(path: str | Path, image_dir: str | Path | None, bad: BadInputLog) -> list[Example]:
    suffix = Path(path).suffix.lower()
    if suffix in (".tsv", ".txt"):
        return read_tsv(path, image_dir, bad)
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path, image_dir, bad)
    raise ValueError(f"{path}: unknown collection format {suffix!r} (use .tsv or .jsonl)")
