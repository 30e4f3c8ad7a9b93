"""Several (n_i, D) float32 row blocks read as one (N, D) matrix, without copying them together.

Growing an index of millions appends a few new rows to a memory-mapped `embeddings.npy` of
gigabytes; `np.concatenate` would pull the whole file into RAM. `RowBlocks` answers what the
index code asks of its rows (`shape`, a contiguous slice, a gather of row numbers) block by
block, and `ImageIndex.save` writes it out in chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class RowBlocks:
    def __init__(self, blocks: Sequence[Any]):
        flat: list[np.ndarray] = []
        for block in blocks:  # a RowBlocks of RowBlocks stays one level deep
            flat.extend(block.blocks if isinstance(block, RowBlocks) else [block])
        if not flat or any(b.ndim != 2 for b in flat) or len({b.shape[1] for b in flat}) != 1:
            raise ValueError(f"row blocks must be 2-d with one width, got {[b.shape for b in flat]}")
        dims = {b.shape[1] for b in flat}
        self.blocks: list[np.ndarray] = [b for b in flat if len(b)] or flat[:1]
        self.bounds = np.cumsum([0] + [len(b) for b in self.blocks])  # (B+1,) first row of each block
        self.shape = (int(self.bounds[-1]), dims.pop())
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 4

    def __getitem__(self, key: Any) -> np.ndarray:
        """A slice with step 1 (N', D), or an array of row numbers (..., D), as float32 copies."""
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError(f"RowBlocks takes slices with step 1, got step {step}")
            stop = max(start, stop)
            pieces = []  # slices of the blocks the range overlaps: sequential reads of a memmap
            for block, first, end in zip(self.blocks, self.bounds[:-1], self.bounds[1:], strict=True):
                lo, hi = max(start, int(first)), min(stop, int(end))
                if lo < hi:
                    pieces.append(np.asarray(block[lo - first : hi - first], np.float32))
            return np.concatenate(pieces) if pieces else np.zeros((0, self.shape[1]), np.float32)
        rows = np.asarray(key, np.int64)
        flat = rows.reshape(-1)
        outside = flat[(flat < -len(self)) | (flat >= len(self))]
        if outside.size:
            raise IndexError(f"row {int(outside[0])} out of range for {len(self)} rows")
        flat = np.where(flat < 0, flat + len(self), flat)
        out = np.empty((len(flat), self.shape[1]), np.float32)
        which = np.searchsorted(self.bounds, flat, side="right") - 1  # the block of each row
        for b in np.unique(which):
            mask = which == b
            out[mask] = self.blocks[b][flat[mask] - self.bounds[b]]
        return out.reshape(*rows.shape, self.shape[1])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The whole matrix in RAM (what HNSW and IVF-Flat training take anyway)."""
        if copy is False:
            raise ValueError("RowBlocks are several arrays: one array of them is always a copy")
        whole = np.concatenate([np.asarray(b, np.float32) for b in self.blocks])
        return whole if dtype is None else whole.astype(dtype, copy=False)
