"""Frozen linear layers whose weights are stored in bfloat16 while activations stay float32.

Decoding one token at a time is bound by memory bandwidth: each step streams every weight of
the LM once (538 MB for SmolLM2-135M in float32) to multiply it by a single row. Storing the
frozen weights in bfloat16 halves the bytes; on CPUs without native bf16 matmul (AVX2) the
bf16 product of a few rows is still ~2.5× faster than float32, while a bf16 product of many
rows is *slower* than float32. So the layer picks per call:

- ≤ `max_rows` rows (decode steps, up to 32 rows decoded together): bf16 × bf16 with float32
  accumulation, result to float32;
- more rows (prefill, training-free scoring): the weight is upcast and the product is float32.

Measured 2026-12-01 (torch 2.13, 2 cores, a 1536×576 weight): the bf16 product takes 113 µs at
1 row, 144 µs at 16 and 152 µs at 32, against 262, 410 and 501 µs upcast, so batched decoding
(`BatchDecoder`) stays on the bf16 path up to 32 rows.

Everything else (norms, attention, residual stream) keeps the model's float32. The only change
from a float32 model is rounding: weights to bf16 everywhere, and on the few-row path the
inputs and outputs of each product (~0.2% relative per product).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BF16WeightLinear(nn.Module):
    def __init__(self, linear: nn.Linear, max_rows: int = 32):
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
