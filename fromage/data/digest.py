"""Content digests of image files (cheap to import: no torch)."""

from __future__ import annotations

import hashlib
import os

from ..fileio import sha1_file
from .shards import read_member, split_tar_ref


def file_digest(path: str | os.PathLike) -> str:
    """SHA-1 of the file's bytes: the same picture under another path has the same digest.
    A tar reference (`shard.tar#member`, data/shards.py) digests the member's bytes, so an image
    inside a shard shares its cached features with the same image as a plain file."""
    member = split_tar_ref(path)
    if member is not None:
        return hashlib.sha1(read_member(*member)).hexdigest()
    return sha1_file(path)
