"""Frozen linear weights stored as int8, one scale per output row (weight-only quantisation).

Decoding one token reads every weight once; int8 halves the bytes of bf16. PyTorch's CPU kernel
`torch._weight_int8pack_mm` (bf16 activations × int8 weights × bf16 row scales, the kernel
gpt-fast and torchao use) reads them at close to the memory bandwidth on this machine:
measured 2026-12-02 (torch 2.13, 2 cores, AVX-512), one row × a 3072×576 weight takes 75 µs
against 160–192 µs for the bf16 product and 216 µs in float32 (`bench/bandwidth.py`).

That kernel's cost grows with the rows, so a product of many rows (a prompt) takes another
path: on CPUs that multiply bf16 in hardware (`bf16_weights.native_bf16`) the int8 rows are
converted to bf16 (exactly: |q| ≤ 127 fits bf16's 8-bit significand), multiplied in bf16 with
float32 accumulation, and the row scales applied to the float32 result; elsewhere the weight is
dequantised to float32. 30 layers of SmolLM2-135M, 2 cores, AMX (`bench/prompt_products.py`):
25 / 38 / 60 / 103 ms at 8 / 16 / 32 / 64 rows with the int8 kernel, 42 / 46 / 46 / 51 ms
through bf16, 82 / 83 / 100 / 123 ms in float32.

Quantisation is symmetric per output row: `w ≈ q · scale`, `q` in [-127, 127], `scale` =
max |w| of the row / 127. The naive twin of every product here is the float32 product with
the dequantised weight `q · scale` (tests/test_fast_llama.py): the only other change is the
bf16 rounding of the inputs and outputs of each product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight → ((out, in) int8, (out,) float32 scales), w ≈ q · scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight the int8 products stand for."""
    return q.float() * scale.float()[:, None]


class Int8Product:
    """`x @ w.T` for one frozen weight held as int8 rows: x (r, in) float32 → (r, out) float32.
    The scales are kept in bf16, which the kernel takes, and rounded there once. Up to
    `max_rows` rows take the int8 kernel; more go through bf16 (`wide_bf16`) or the
    dequantised float32 weight (`for_this_cpu` picks both)."""

    kind = 2  # fast_llama.INT8: how the scripted step multiplies it

    def __init__(self, weight: torch.Tensor, max_rows: int = 32, wide_bf16: bool = False):
        q, scale = quantize_rows(weight)
        self.q = q
        self.scale = scale.to(torch.bfloat16)
        self.max_rows, self.wide_bf16 = max_rows, wide_bf16

    @property
    def held(self) -> torch.Tensor:
        return self.q

    @staticmethod
    def rows_for_this_cpu() -> tuple[int, bool]:
        """(max_rows, wide_bf16): with bf16 units, more than 16 rows go through bf16 (faster
        there than the int8 kernel); without, up to 32 rows take the int8 kernel and more the
        float32 product."""
        from . import bf16_weights

        wide = bf16_weights.native_bf16()
        return (16 if wide else 32), wide

    @classmethod
    def stacked(cls, parts: list[Int8Product]) -> Int8Product:
        """One product for several weights stacked along their outputs (fused q/k/v): the
        rows and their scales are concatenated as they are, no second rounding."""
        out = cls.__new__(cls)
        out.q = torch.cat([p.q for p in parts]).contiguous()
        out.scale = torch.cat([p.scale for p in parts])
        out.max_rows, out.wide_bf16 = parts[0].max_rows, parts[0].wide_bf16
        return out

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 2

    def dequantized(self) -> torch.Tensor:
        return dequantize_rows(self.q, self.scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (r, in) float32 → (r, out) float32
        if x.shape[0] <= self.max_rows:
            return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scale).float()
        if self.wide_bf16:
            return F.linear(x.to(torch.bfloat16), self.q.to(torch.bfloat16)).float() * self.scale.float()
        return F.linear(x, self.dequantized())


class Int8WeightLinear(nn.Module):
    """An `nn.Linear` whose frozen weight is stored as int8 rows: up to `max_rows` rows (decode
    steps) use the int8 kernel; more rows (prefill) multiply the int8 rows converted to bf16
    when `wide_bf16` (then scale the float32 result), or the dequantised float32 weight."""

    @classmethod
    def for_this_cpu(cls, linear: nn.Linear) -> Int8WeightLinear:
        max_rows, wide = Int8Product.rows_for_this_cpu()
        return cls(linear, max_rows=max_rows, wide_bf16=wide)

    def __init__(self, linear: nn.Linear, max_rows: int = 32, wide_bf16: bool = False):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.product = Int8Product(linear.weight, max_rows, wide_bf16)
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    @property
    def max_rows(self) -> int:
        return self.product.max_rows

    @property
    def wide_bf16(self) -> bool:
        return self.product.wide_bf16

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised float32 weight (what prefill multiplies by; the tests' naive twin)."""
        return self.product.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (…, in) → (…, out)
        rows = x.numel() // max(x.shape[-1], 1)
        out = self.product(x.reshape(rows, -1).float()).reshape(*x.shape[:-1], -1).to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        wide = "bfloat16" if self.wide_bf16 else "float32"
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=int8, many rows in {wide}"
