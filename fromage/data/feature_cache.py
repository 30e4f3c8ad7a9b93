"""Frozen image features, computed once and cached on disk.

The key of a feature is (encoder id, SHA-1 of the image file's bytes, view): the same picture
under another path hits the cache, an edited file misses it. The cache is a directory of
safetensors shards, one per `compute` call that found something new; each shard stores its keys
in its metadata, so opening the cache reads no tensors.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..fileio import atomic_write
from .digest import file_digest

__all__ = ["FeatureCache", "file_digest"]

log = logging.getLogger(__name__)


class FeatureCache:
    def __init__(self, root: str | os.PathLike, encoder_id: str):
        safe_id = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in encoder_id)
        self.dir = Path(root) / safe_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self._where: dict[str, tuple[Path, int]] = {}
        for shard in sorted(self.dir.glob("*.safetensors")):
            try:
                with safe_open(str(shard), "pt") as f:
                    keys = json.loads((f.metadata() or {}).get("keys", "[]"))
            except Exception as exc:  # a torn shard from a killed run: ignore it, recompute
                log.warning("ignoring unreadable feature shard %s (%s)", shard, exc)
                continue
            for row, key in enumerate(keys):
                self._where[key] = (shard, row)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def get(self, keys: Sequence[str]) -> torch.Tensor:
        """(N, F) features for keys that are all in the cache."""
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            shard, row = self._where[key]
            by_shard.setdefault(shard, []).append((i, row))
        out: torch.Tensor | None = None
        for shard, pairs in by_shard.items():
            with safe_open(str(shard), "pt") as f:
                table = f.get_tensor("features")
            if out is None:
                out = torch.empty(len(keys), table.shape[1])
            idx = torch.tensor([i for i, _ in pairs])
            rows = torch.tensor([r for _, r in pairs])
            out[idx] = table[rows]
        return out if out is not None else torch.zeros(0, 0)

    def put(self, keys: Sequence[str], features: torch.Tensor) -> None:
        if len(keys) != features.shape[0]:
            raise ValueError(f"{len(keys)} keys but {features.shape[0]} feature rows")
        if not keys:
            return
        name = self.dir / f"shard-{uuid.uuid4().hex[:12]}.safetensors"
        atomic_write(
            name,
            lambda tmp: save_file(
                {"features": features.float().contiguous()}, tmp, metadata={"keys": json.dumps(list(keys))}
            ),
        )
        for row, key in enumerate(keys):
            self._where[key] = (name, row)
