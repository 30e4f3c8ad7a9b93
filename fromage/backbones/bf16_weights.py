"""Frozen linear layers whose weights are stored in bfloat16 while activations stay float32.

Decoding one token at a time is bound by memory bandwidth: each step streams every weight of
the LM once (538 MB for SmolLM2-135M in float32) to multiply it by a single row. Storing the
frozen weights in bfloat16 halves the bytes. How many rows go through the bf16 product depends
on the CPU (`native_bf16`):

- with bf16 units (AVX512-BF16 or AMX), every product is bf16 × bf16 with float32
  accumulation, result to float32. Measured 2026-12-02 (torch 2.13, 2 cores, AMX, 30 layers
  of SmolLM2-135M, `bench/prompt_products.py`): 26 / 32 / 48 ms at 32 / 64 / 128 rows,
  against 79 / 105 / 137 ms upcasting the weight to float32 and 56 / 79 / 118 ms with
  float32 weights;
- without them (AVX2), the bf16 product of a few rows is still ~2.5× faster than float32
  while one of many rows is *slower*, so above `max_rows` (32, what batched decoding uses)
  the weight is upcast and the product is float32. Measured 2026-12-01 on such a path, a
  1536×576 weight: 113 µs at 1 row, 144 µs at 16 and 152 µs at 32, against 262, 410 and
  501 µs upcast.

Everything else (norms, attention, residual stream) keeps the model's float32. The only change
from a float32 model is rounding: weights to bf16 everywhere, and on the bf16 path the inputs
and outputs of each product (~0.2% relative per product).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 32
"""Rows that take the bf16 product on CPUs without bf16 units (decode steps of up to 32 rows)."""


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX tiles)."""
    cpu = torch.cpu
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())  # type: ignore[attr-defined]
    except AttributeError:  # an older torch without the probes: assume not
        return False


def bf16_rows() -> int:
    """The most rows a bf16-stored layer multiplies in bf16 on this CPU (every row, or a few)."""
    return 1 << 62 if native_bf16() else FEW_ROWS


class BF16WeightLinear(nn.Module):
    """`max_rows`: the most rows multiplied in bf16; more are multiplied in float32 with the
    weight upcast (`bf16_rows()` picks it for this CPU)."""

    @classmethod
    def for_this_cpu(cls, linear: nn.Linear) -> BF16WeightLinear:
        return cls(linear, max_rows=bf16_rows())

    def __init__(self, linear: nn.Linear, max_rows: int = FEW_ROWS):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.max_rows = max_rows
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (…, in) → (…, out)
        rows = x.numel() // max(x.shape[-1], 1)
        if rows <= self.max_rows:
            out = F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        else:
            out = F.linear(x, self.weight.to(x.dtype))
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=bfloat16"
