"""A key/value cache layer that appends in place, for batched decoding (`generate.BatchDecoder`).

Hugging Face's `DynamicLayer` concatenates a layer's whole cache with the new position at every
step: for 16 rows × 200 positions × 30 layers of SmolLM2-135M that is ~150 MB copied per
decoding step, ~30 ms of a ~90 ms step on 2 cores (BENCHMARKS.md, issue #17). This layer keeps
its keys and values as views of a buffer with spare positions, so a step writes one column in
place; the buffer is reallocated (with room to spare) only when it is full or when the batch
replaced the tensors (a row joined or left). The numbers are the same, only the copies go.

Only the two methods decoding uses change (`update`, and the start from a prefilled layer);
everything else is `DynamicLayer`'s.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

SPARE = 64
"""Positions reserved beyond what is needed whenever the buffer is (re)allocated."""


class GrowingLayer(DynamicLayer):
    def __init__(self, layer: DynamicLayer | None = None):
        super().__init__()
        self._keys_buffer: torch.Tensor | None = None  # (B, heads, capacity, hd)
        self._values_buffer: torch.Tensor | None = None
        if layer is not None and layer.is_initialized:
            self.device = layer.keys.device  # type: ignore[union-attr]
            self.keys, self.values = layer.keys, layer.values
            self.is_initialized = True

    def _holds(self, length: int, new: torch.Tensor) -> bool:
        """Whether the buffer still backs `self.keys` and has room for `length` positions."""
        buffer = self._keys_buffer
        return (
            buffer is not None
            and self.keys is not None
            and self.keys.data_ptr() == buffer.data_ptr()
            and buffer.shape[:2] == new.shape[:2]
            and buffer.shape[-1] == new.shape[-1]
            and buffer.shape[2] >= length
        )

    def _reserve(self, length: int, new: torch.Tensor, filled: int) -> None:
        """New buffers with room for `length` + SPARE positions, holding the `filled` ones."""
        shape = (*new.shape[:2], length + SPARE, new.shape[-1])
        keys = torch.empty(shape, dtype=new.dtype, device=new.device)
        values = torch.empty(shape, dtype=new.dtype, device=new.device)
        if filled:
            keys[:, :, :filled] = self.keys
            values[:, :, :filled] = self.values
        self._keys_buffer, self._values_buffer = keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, heads, n, hd) keys/values; → the whole cache's (B, heads, T + n, hd) views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        filled = self.get_seq_length()
        length = filled + key_states.shape[-2]
        if not self._holds(length, key_states):
            self._reserve(length, key_states, filled)
        assert self._keys_buffer is not None and self._values_buffer is not None
        self._keys_buffer[:, :, filled:length] = key_states
        self._values_buffer[:, :, filled:length] = value_states
        self.keys = self._keys_buffer[:, :, :length]
        self.values = self._values_buffer[:, :, :length]
        return self.keys, self.values


def growing(cache: Any) -> Any:
    """Swap a prefilled cache's plain `DynamicLayer`s for `GrowingLayer`s (in place; other
    kinds, e.g. sliding-window layers, are kept as they are); → the cache."""
    cache.layers = [GrowingLayer(layer) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
