"""Webdataset tar shards as `img2dataset` writes them, read with the stdlib `tarfile`.

A shard is an uncompressed tar whose members are grouped into samples by key: the member name
up to the first dot of its basename (`00000/000000012.jpg`, `.txt`, `.json` share the key
`00000/000000012`). The caption comes from `.txt`, else from the `.json` field `caption`.

An image inside a shard is named by a *tar reference*, `/abs/path/00001.tar#00001/000000012.jpg`,
which `fromage.data.images.load_image` and `digest.file_digest` both accept: the bytes are read by
seeking to the member's data through a per-shard table (member → offset, size) built once per
process from the tar headers alone. A string is a tar reference only when it is not itself an
existing file and the part before `#` is an existing `.tar` file, so ordinary paths containing
`#` keep working.

Bad input is counted in `BadInputLog` by kind and skipped, as the TSV/JSONL readers do:
`missing shard`, `unreadable tar`, `truncated tar` (the samples before the cut are kept),
`missing image`, `missing caption`, `caption not utf-8`, `malformed json`. Undecodable image
bytes are found later, when the image is decoded (`undecodable image`).

Cheap to import: stdlib only.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from .examples import Example
from .readers import BadInputLog

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TABLES_PER_PROCESS = 64
"""Shard tables kept per process (least recently used dropped): a 10k-sample shard's table is
~3 MB, and readers go through shards in order, so a few suffice."""

_RANGES = re.compile(r"\{(\d+)\.\.(\d+)\}")


# ---------------------------------------------------------------- shard lists


def is_shard_source(source: str | os.PathLike) -> bool:
    """A source naming tar shards: a `.tar` path, glob or brace pattern (`data/{00000..00099}.tar`)."""
    return os.fspath(source).lower().endswith(".tar")


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as webdataset/img2dataset write it (the `braceexpand` package):
    `{000..012}` zero-padded, `{a,b,c}`, several groups multiply, `{x}` stays literal. A range
    that runs backwards is refused: in a shard pattern it is a typo, not a wish for reverse order."""
    from braceexpand import braceexpand

    for lo_text, hi_text in _RANGES.findall(pattern):
        if int(hi_text) < int(lo_text):
            raise ValueError(
                f"brace range {{{lo_text}..{hi_text}}} in {pattern!r} runs backwards ({int(lo_text)} > {int(hi_text)})"
            )
    return list(braceexpand(pattern))


def shard_paths(pattern: str | os.PathLike) -> list[str]:
    """Every shard a pattern names, in order: braces expanded, then globs matched. Names that do
    not exist are kept (the reader counts them as `missing shard`); a pattern that matches no
    existing file at all is an error."""
    out: dict[str, None] = {}
    for expanded in expand_braces(os.fspath(pattern)):
        if glob.has_magic(expanded):
            for match in sorted(glob.glob(expanded)):
                out[match] = None
        else:
            out[expanded] = None
    paths = list(out)
    if not any(os.path.isfile(p) for p in paths):
        raise FileNotFoundError(f"shard pattern {os.fspath(pattern)!r} matches no file")
    return paths


# ---------------------------------------------------------------- one shard's member table


@dataclass
class ShardScan:
    members: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Regular-file member name → (offset of its data in the file, size), in archive order;
    only members whose data lies wholly inside the file."""
    kind: str = ""
    """'' for a complete archive, else `truncated tar` or `unreadable tar`."""
    problem: str = ""
    cut_member: str = ""
    """The member whose data the end of the file cuts through, if that is where it ends."""


def scan_shard(path: str | os.PathLike) -> ShardScan:
    """Read the tar headers (seeking past the data) into a member table; say whether the archive
    is complete. `tarfile` stops silently at a cut header, so completeness is checked here: the
    archive must end in a zero block right after the last member's data."""
    path = os.fspath(path)
    scan = ShardScan()
    file_size = os.path.getsize(path)
    try:
        tar = tarfile.open(path, mode="r:")
    except tarfile.ReadError as exc:
        # A file shorter than one header block is a shard cut while being written.
        scan.kind = "truncated tar" if file_size < tarfile.BLOCKSIZE else "unreadable tar"
        scan.problem = f"{path}: not a readable tar ({exc})"
        return scan
    with tar:
        try:
            # (tarfile keeps every TarInfo until closed: ~1 KB per member, transient)
            while (info := tar.next()) is not None:
                if info.offset_data + info.size > file_size:
                    scan.cut_member = info.name
                    break  # reported below
                if info.isfile():
                    scan.members[info.name] = (info.offset_data, info.size)
        except tarfile.ReadError as exc:
            scan.kind, scan.problem = "truncated tar", f"{path}: archive ends early ({exc})"
            return scan
        end = tar.offset  # where the next header (here: the end-of-archive zero block) starts
    with open(path, "rb") as f:
        f.seek(end)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        scan.kind = "truncated tar"
        scan.problem = f"{path}: archive ends early at byte {file_size} (no end-of-archive block)"
    return scan


_tables: OrderedDict[tuple[str, int, int], dict[str, tuple[int, int]]] = OrderedDict()
_tables_lock = threading.Lock()


def member_table(shard: str) -> dict[str, tuple[int, int]]:
    """The shard's member → (offset, size) table, scanned once per process per file version."""
    stat = os.stat(shard)
    key = (os.path.abspath(shard), stat.st_size, stat.st_mtime_ns)
    with _tables_lock:
        if key in _tables:
            _tables.move_to_end(key)
            return _tables[key]
        table = scan_shard(shard).members
        _tables[key] = table
        while len(_tables) > TABLES_PER_PROCESS:
            _tables.popitem(last=False)
        return table


def _remember(shard: str, members: dict[str, tuple[int, int]]) -> None:
    """Keep a table the listing already built, so loading images does not scan again."""
    stat = os.stat(shard)
    with _tables_lock:
        _tables[(os.path.abspath(shard), stat.st_size, stat.st_mtime_ns)] = members
        while len(_tables) > TABLES_PER_PROCESS:
            _tables.popitem(last=False)


# ---------------------------------------------------------------- tar references


def tar_ref(shard: str | os.PathLike, member: str) -> str:
    return f"{os.path.abspath(shard)}#{member}"


def split_tar_ref(ref: str | os.PathLike) -> tuple[str, str] | None:
    """(shard, member) when `ref` names a member of an existing `.tar` file, else None (a plain
    path, even one containing `#`)."""
    text = os.fspath(ref)
    if "#" not in text or os.path.exists(text):
        return None
    start = 0
    while (cut := text.find(".tar#", start)) != -1:
        shard = text[: cut + 4]
        if os.path.isfile(shard):
            return shard, text[cut + 5 :]
        start = cut + 1
    return None


def read_member(shard: str, member: str) -> bytes:
    """The bytes of one member, by seek. Raises OSError (FileNotFoundError for an absent member)."""
    where = member_table(shard).get(member)
    if where is None:
        raise FileNotFoundError(f"{shard}: no member {member!r} (or its data is cut off)")
    offset, size = where
    with open(shard, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{shard}#{member}: expected {size} bytes at offset {offset}, read {len(data)}")
    return data


# ---------------------------------------------------------------- samples → examples


def _key_and_extension(name: str) -> tuple[str, str]:
    """`00000/000000012.jpg` → (`00000/000000012`, `jpg`): the key ends at the basename's first dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (extension.lower() if dot else "")


def read_shard(shard: str, bad: BadInputLog) -> list[Example]:
    """The captioned images of one shard; bad samples counted by kind and skipped."""
    if not os.path.isfile(shard):
        bad.add("missing shard", f"{shard}: no such shard")
        return []
    scan = scan_shard(shard)
    samples: dict[str, dict[str, str]] = {}  # key → extension → member name, in archive order
    for name in scan.members:
        key, extension = _key_and_extension(name)
        samples.setdefault(key, {}).setdefault(extension, name)
    if scan.kind:
        if scan.cut_member:  # the sample whose member is cut is incomplete
            samples.pop(_key_and_extension(scan.cut_member)[0], None)
        elif scan.kind == "truncated tar" and samples:
            samples.popitem()  # cut between members: the last sample may lack some; drop it
        bad.add(scan.kind, f"{scan.problem}; kept the {len(samples)} complete samples before it")
    _remember(shard, scan.members)
    out: list[Example] = []
    with open(shard, "rb") as f:

        def read(name: str) -> bytes:
            offset, size = scan.members[name]
            f.seek(offset)
            return f.read(size)

        for key, parts in samples.items():
            where = f"{shard}#{key}"
            image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
            if image is None:
                bad.add("missing image", f"{where}: no image member (.{', .'.join(IMAGE_EXTENSIONS[:4])})")
                continue
            caption = ""
            if "txt" in parts:
                try:
                    caption = read(parts["txt"]).decode("utf-8").strip()
                except UnicodeDecodeError as exc:
                    bad.add("caption not utf-8", f"{where}.txt: caption is not UTF-8 ({exc.reason})")
                    continue
            if "json" in parts:
                try:
                    meta = json.loads(read(parts["json"]))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    bad.add("malformed json", f"{where}.json: invalid JSON ({exc})")
                    continue
                if not isinstance(meta, dict):
                    bad.add("malformed json", f"{where}.json: expected a JSON object")
                    continue
                if not caption and isinstance(meta.get("caption"), str):
                    caption = meta["caption"].strip()
            if not caption:
                bad.add("missing caption", f"{where}: no caption (.txt empty or absent, no json `caption`)")
                continue
            out.append(Example(tar_ref(shard, image), caption, Path(shard).name, caption))
    return out


def read_shards(pattern: str | os.PathLike, bad: BadInputLog) -> list[Example]:
    """Every captioned image of the shards a pattern names, shard by shard, in order."""
    return [example for shard in shard_paths(pattern) for example in read_shard(shard, bad)]


def holdout_key(example: Example) -> str:
    """What the validation holdout hashes: shard file name + member, the same on every machine."""
    parts = split_tar_ref(example.image)
    if parts is None:
        return example.image
    return f"{Path(parts[0]).name}#{parts[1]}"


def shard_set_name(pattern: str | os.PathLike) -> str:
    """A short name for a shard set (its folder's name), used for its validation split."""
    return f"shards-{Path(os.fspath(pattern)).parent.name or 'root'}"
