"""File helpers every layer shares: atomic writes and content hashes.

A leaf: imports nothing from the package (and no torch), so checkpoints, indexes, reports and
training state all write the same way: a hidden temporary name beside the target, fsync, rename.
A reader never sees half a file, and a killed writer leaves only a `.name.*` temporary behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` to fill a temporary file beside `path`, fsync it, then rename it
    over `path`. On any error the temporary is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def sha256_files(paths: Iterable[str | os.PathLike]) -> str:
    """Hex SHA-256 over the files' bytes, in order, read 1 MiB at a time."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return sha256_files([path])


def sha1_file(path: str | os.PathLike) -> str:
    """Hex SHA-1 of a file's bytes (image digests: short, and only identity is needed)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stable_bucket(key: str, buckets: int = 10_000) -> int:
    """A string's bucket in [0, buckets), the same on every machine and run (held-out splits)."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % buckets
