"""Serving indexed image files: a file is sent only if its bytes are still the ones indexed."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from ...data.digest import file_digest

REMEMBERED = 100_000
"""Checked files remembered (by path, size and modification time), most recent first."""


class VerifiedFiles:
    """Compares a file's content digest with the one its index row stores; a file is hashed
    once while its size and modification time stay the same."""

    def __init__(self) -> None:
        self._digests: OrderedDict[tuple[str, int, int], str] = OrderedDict()
        self._lock = threading.Lock()

    def matches(self, path: str, digest: str | None) -> bool:
        if not digest:  # a row without a digest (an index from another tool) cannot be checked
            return True
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            known = self._digests.get(key)
            if known is not None:
                self._digests.move_to_end(key)
        if known is None:
            known = file_digest(path)
            with self._lock:
                self._digests[key] = known
                while len(self._digests) > REMEMBERED:
                    self._digests.popitem(last=False)
        return known == digest
