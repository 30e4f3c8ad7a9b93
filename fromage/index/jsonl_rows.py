"""The rows of an index's `metadata.jsonl`, parsed one at a time when asked for.

An index of 10M images has ~1.5 GB of metadata; parsed into Python dicts it would take several
GB in every process that loads the index (a server, each worker). Here the file is
memory-mapped and one scan for newlines (numpy, in chunks) gives each row's byte span: 16
bytes per row in RAM, and a row costs one `json.loads` when it is read.

Lines are split on b"\\n" only. (`str.splitlines`, used before, also splits on U+2028, U+0085
and others, which `json.dumps(..., ensure_ascii=False)` leaves raw inside a caption; such a
caption broke the row count.)
"""

from __future__ import annotations

import json
import operator
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, overload

import numpy as np

SCAN_CHUNK = 64 << 20
"""Bytes examined per step of the newline scan (bounds its temporary arrays)."""

# The digest key as `json.dumps` writes it, then the first 16 hex digits of its value. Inside a
# JSON string every quote is escaped, so this byte pattern only occurs as a real key.
_DIGEST = re.compile(rb'"digest"\s*:\s*"([0-9a-fA-F]{16})')
_HEX = np.full(256, 255, np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint8)
_KEY = np.frombuffer(b'"digest": "', np.uint8)  # as `json.dumps` writes it, before the value
TABLE_CHUNK = 1 << 20
"""Digests turned into table keys per step (bounds the (chunk, 16) temporaries to ~400 MB)."""


class _Rows(Sequence[dict]):
    """Indexing shared by the row sequences here: ints (negative ones from the end) and
    slices; a subclass gives `__len__` and `_row(j)` for 0 <= j < len."""

    def _row(self, j: int) -> dict:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> dict: ...

    @overload
    def __getitem__(self, i: slice) -> list[dict]: ...

    def __getitem__(self, i: int | slice) -> dict | list[dict]:
        if isinstance(i, slice):
            return [self._row(j) for j in range(*i.indices(len(self)))]
        j = operator.index(i)
        if j < 0:
            j += len(self)
        if not 0 <= j < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        return self._row(j)


class JsonlRows(_Rows):
    """A read-only sequence of the JSON objects in `path`, one per non-empty line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        self._bytes = np.memmap(self.path, np.uint8, "r") if size else np.zeros(0, np.uint8)
        self._starts, self._ends = _line_spans(self._bytes)
        self._digest_keys: np.ndarray | None = None  # (M,) uint64 digest prefixes, sorted
        self._digest_rows: np.ndarray | None = None  # (M,) int64 rows, in the same order
        self._table_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._starts)

    def __iter__(self) -> Iterator[dict]:
        for j in range(len(self)):
            yield self._row(j)

    def write_to(self, f: BinaryIO) -> None:
        """The file's bytes as mapped (not re-read from the path, which a writer may have
        replaced since), so that saving a loaded index copies its metadata unparsed. Ends
        with a newline, so that rows written after it start a line of their own."""
        for start in range(0, len(self._bytes), SCAN_CHUNK):
            f.write(self._bytes[start : start + SCAN_CHUNK].tobytes())
        if len(self._bytes) and self._bytes[-1] != 10:
            f.write(b"\n")

    def _row(self, j: int) -> dict:
        raw = self._bytes[self._starts[j] : self._ends[j]].tobytes()
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{self.path}: row {j + 1} (byte {self._starts[j]}) is not valid JSON ({error})"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(
                f"{self.path}: row {j + 1} (byte {self._starts[j]}) is a JSON {type(row).__name__}, not an object"
            )
        return row

    def row_of_digest(self, digest: str) -> int | None:
        """The first row whose "digest" is `digest`, or None. The first call scans the file
        once for digests (a regex over the mapped bytes) and keeps a sorted table of their
        64-bit prefixes (16 bytes per row); a lookup is then a binary search, confirmed by
        parsing the candidate rows. A digest that is not hex is looked for row by row."""
        if len(digest) < 16 or any(c not in "0123456789abcdefABCDEF" for c in digest[:16]):
            return next((j for j, row in enumerate(self) if row.get("digest") == digest), None)
        with self._table_lock:  # built once, even when two threads ask first
            if self._digest_keys is None:
                self._digest_keys, self._digest_rows = self._digest_table()
        assert self._digest_keys is not None and self._digest_rows is not None
        key = np.uint64(int(digest[:16], 16))
        lo = int(np.searchsorted(self._digest_keys, key, side="left"))
        hi = int(np.searchsorted(self._digest_keys, key, side="right"))
        for row in np.sort(self._digest_rows[lo:hi]):  # the first row wins
            if self._row(int(row)).get("digest") == digest:
                return int(row)
        return None

    def _digest_table(self, vectorised: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(M,) uint64 keys (the first 16 hex digits of every "digest" value) and (M,) int64
        rows, sorted by key (rows of one key in no particular order).

        The lines `save` writes end with `"digest": "<hex digits>"}`: numpy checks that tail
        for all lines at once and reads the key from it (~1 s for 10M rows; the regex over
        the whole file took ~18 s). Other lines go through the regex, as every line does with
        `vectorised=False`, the naive twin the tests compare against."""
        data = self._bytes.view(np.ndarray)  # still the mapping; plain gathers are ~3x faster
        # windows[i] is data[i : i + 16] (a view): gathering rows of it is ~3x faster than
        # gathering data at an (L, 16) array of offsets.
        windows = np.lib.stride_tricks.sliding_window_view(data, 16) if len(data) >= 16 else data[:0, None]
        keys, rows, others = [], [], np.arange(len(self))
        if vectorised:
            leftover = []
            for s in range(0, len(self), TABLE_CHUNK):
                starts, ends = self._starts[s : s + TABLE_CHUNK], self._ends[s : s + TABLE_CHUNK]
                at = ends - 42  # where the hex digits start: 40 of them (SHA-1), then '"}'
                ok = at - len(_KEY) >= starts
                a = at[ok]
                nibbles = _HEX[windows[a]]  # (L, 16), 255 = not hex
                good = ok.copy()
                good[ok] = (
                    (windows[a - len(_KEY)][:, : len(_KEY)] == _KEY).all(1)
                    & (nibbles < 16).all(1)
                    & (data[a + 40] == ord('"'))
                    & (data[a + 41] == ord("}"))
                )
                keys.append(_keys(nibbles[good[ok]]))
                rows.append(s + np.flatnonzero(good))
                leftover.append(s + np.flatnonzero(~good))
            others = np.concatenate([np.zeros(0, np.int64), *leftover])
        at_list: list[int] = []
        for j in others.tolist():  # the regex, line by line (all lines when not vectorised)
            line: Any = memoryview(data[self._starts[j] : self._ends[j]])
            at_list.extend(self._starts[j] + m.start(1) for m in _DIGEST.finditer(line))
        at = np.array(at_list, np.int64)
        for s in range(0, len(at), TABLE_CHUNK):
            keys.append(_keys(_HEX[windows[at[s : s + TABLE_CHUNK]]]))
        rows.append(np.searchsorted(self._starts, at, side="right") - 1)  # the line of each match
        all_keys = np.concatenate([np.zeros(0, np.uint64), *keys])
        all_rows = np.concatenate([np.zeros(0, np.int64), *rows]).astype(np.int64)
        order = np.argsort(all_keys)  # not stable (3x faster): a lookup sorts its few rows
        return all_keys[order], all_rows[order]


def _keys(nibbles: np.ndarray) -> np.ndarray:
    """(L, 16) hex digit values → (L,) uint64: the 64-bit number they spell."""
    shifts = np.arange(15, -1, -1, dtype=np.uint64) * np.uint64(4)
    return (nibbles.astype(np.uint64) << shifts).sum(1, dtype=np.uint64)


def _line_spans(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) start and end byte offsets of the lines of `data` that are not blank (a trailing
    \\r is not part of a line)."""
    size = len(data)
    breaks = [np.flatnonzero(data[s : s + SCAN_CHUNK] == 10) + s for s in range(0, size, SCAN_CHUNK)]
    newlines = np.concatenate([np.zeros(0, np.int64), *breaks]).astype(np.int64)
    starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
    ends = np.concatenate([newlines, [size]]).astype(np.int64)
    crlf = ends > starts
    crlf[crlf] = data[ends[crlf] - 1] == 13
    ends -= crlf
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    # Lines of only spaces or tabs are not rows either; a row starts with "{", so only lines
    # that do not are looked at (none, in a file `save` wrote).
    odd = np.flatnonzero(data[starts] != ord("{")) if len(starts) else np.zeros(0, np.int64)
    blank = [i for i in odd if not data[starts[i] : ends[i]].tobytes().strip()]
    if blank:
        starts, ends = np.delete(starts, blank), np.delete(ends, blank)
    return starts, ends


class ChainedRows(_Rows):
    """Metadata of a grown index: the rows of `parts` one after another (a loaded index's
    `JsonlRows`, then lists of added rows), none of them parsed or copied to chain them."""

    def __init__(self, parts: Sequence[Sequence[dict]]):
        self.parts: list[Sequence[dict]] = []
        for part in parts:  # chains of chains stay one level deep
            self.parts.extend(part.parts if isinstance(part, ChainedRows) else [part])
        self._bounds = np.cumsum([0] + [len(p) for p in self.parts])  # (P+1,) first row of each part

    def __len__(self) -> int:
        return int(self._bounds[-1])

    def _row(self, j: int) -> dict:
        part = int(np.searchsorted(self._bounds, j, side="right")) - 1
        return self.parts[part][j - int(self._bounds[part])]

    def __iter__(self) -> Iterator[dict]:
        for part in self.parts:
            yield from part

    def row_of_digest(self, digest: str) -> int | None:
        for part, first in zip(self.parts, self._bounds, strict=False):
            row = row_of_digest(part, digest)
            if row is not None:
                return int(first) + row
        return None

    def write_to(self, f: BinaryIO) -> None:
        for part in self.parts:
            write_rows(part, f)


def row_of_digest(rows: Sequence[dict], digest: str) -> int | None:
    """The first row of `rows` whose "digest" is `digest`, or None: by the digest table of a
    `JsonlRows` or `ChainedRows`, by a scan of anything else (rows built in memory)."""
    if isinstance(rows, (JsonlRows, ChainedRows)):
        return rows.row_of_digest(digest)
    return next((row for row, m in enumerate(rows) if m.get("digest") == digest), None)


def write_rows(rows: Sequence[dict], f: BinaryIO) -> None:
    """`rows` as JSON lines; the bytes of file-backed rows are copied, not re-serialised."""
    if isinstance(rows, (JsonlRows, ChainedRows)):
        rows.write_to(f)
        return
    for row in rows:
        f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
