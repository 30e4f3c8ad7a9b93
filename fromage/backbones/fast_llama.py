"""A lean one-token decoder step for Llama-family LMs (SmolLM2, Llama, Mistral-style GQA).

Decoding one token at a time on a CPU is bound by memory bandwidth and per-op overhead; the
Hugging Face layer stack spends ~35 ms a token (SmolLM2-135M, 2 cores) on Python and small ops
beyond the weight reads. This step does the same arithmetic with fewer, larger ops: q/k/v and
gate/up products fused into one matrix each, a preallocated key/value cache, the rotary embedding as one
(hd × hd) product, fused RMSNorm, and no wrappers. Weights are kept in float32, bfloat16
(`backbones/bf16_weights.py` explains why) or int8 (`backbones/int8_weights.py`).

It is a fast path with a naive twin: `tests/test_fast_llama.py` checks it against the Hugging
Face model token for token. Only plain Llama layers qualify (`supports`): no attention or MLP
bias, SiLU gating, RMSNorm; anything else keeps the Hugging Face path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .bf16_weights import bf16_rows
from .int8_weights import Int8Product, Int8WeightLinear


def supports(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", "") != "llama":
        return False
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return False
    if getattr(config, "hidden_act", "silu") != "silu":
        return False
    return hasattr(getattr(model, "model", None), "layers")


class FloatProduct:
    """`x @ w.T` with w kept transposed, (in, out), in float32: the exact path."""

    def __init__(self, weight: torch.Tensor):
        self.wt = weight.detach().float().t().contiguous()

    @property
    def nbytes(self) -> int:
        return self.wt.numel() * self.wt.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (r, in) → (r, out)
        return torch.mm(x, self.wt)


class BF16Product:
    """`x @ w.T` with w (out, in) in bf16. One row is a matrix-vector product: it reads the
    weight faster than `mm` here (160 vs 192 µs for 3072×576, `bench/bandwidth.py`); up to
    `bf16_rows()` rows are a bf16 product, more upcast the weight (bf16_weights.py says why)."""

    def __init__(self, weight: torch.Tensor):
        self.w = weight.detach().float().to(torch.bfloat16).contiguous()
        self.max_rows = bf16_rows()

    @property
    def nbytes(self) -> int:
        return self.w.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (r, in) → (r, out)
        if x.shape[0] == 1:
            return torch.mv(self.w, x[0].to(torch.bfloat16))[None].float()
        if x.shape[0] <= self.max_rows:
            return F.linear(x.to(torch.bfloat16), self.w).float()
        return F.linear(x, self.w.float())


Product = FloatProduct | BF16Product | Int8Product


def fused_product(linears: list[nn.Module], dtype: torch.dtype) -> Product:
    """One product for linear layers that read the same input, stacked along their outputs.
    Int8-stored layers (`Int8WeightLinear`) keep their own rows and scales; any other layer's
    weight (float32 or bf16-stored) is taken as float32 and stored as `dtype`."""
    if all(isinstance(m, Int8WeightLinear) for m in linears):
        return Int8Product.stacked([m.product for m in linears])  # type: ignore[union-attr]
    weight = torch.cat([m.weight.detach().float() for m in linears])  # type: ignore[union-attr]
    if dtype == torch.int8:
        return Int8Product(weight, *Int8Product.rows_for_this_cpu())
    return BF16Product(weight) if dtype == torch.bfloat16 else FloatProduct(weight)


def _rotate_half(head_dim: int) -> torch.Tensor:
    """(hd, hd) P with x @ P = rotate_half(x) = cat(-x[half:], x[:half]) (HF Llama's convention)."""
    half = head_dim // 2
    p = torch.zeros(head_dim, head_dim)
    p[torch.arange(half) + half, torch.arange(half)] = -1.0
    p[torch.arange(half), torch.arange(half) + half] = 1.0
    return p


@dataclass
class StepCache:
    """One answer's keys/values for the lean step: (layers, kv heads, max_len, hd) each, float32;
    `length` positions filled."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int


class LlamaStepper:
    """Built once per model (fused weights). `start(cache, length, max_len)` takes over a
    Hugging Face cache after a prompt and returns the answer's own `StepCache`; each
    `step(x, cache)` then runs one token through every layer and returns (last hidden,
    layer-`ret_layer` hidden), both after the final norm, (1, d).

    `dtype` stores the products' weights: float32 (exact), bfloat16, or int8 (per-row scales,
    `backbones/int8_weights.py`); int8-stored layers are used as they are whatever `dtype`."""

    def __init__(self, model: nn.Module, ret_layer: int, dtype: torch.dtype = torch.bfloat16):
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not a plain Llama model")
        if dtype not in (torch.float32, torch.bfloat16, torch.int8):
            raise ValueError(f"the lean step stores weights as float32, bfloat16 or int8, not {dtype}")
        config = model.config  # type: ignore[attr-defined]
        base = model.model  # type: ignore[attr-defined]
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.inter = int(config.intermediate_size)
        self.layers = len(base.layers)
        self.ret_layer = ret_layer if ret_layer not in (-1, self.layers) else self.layers
        self.eps = float(config.rms_norm_eps)
        self.rotary = base.rotary_emb
        self.norm_weight = base.norm.weight.detach().float()
        self.dtype = dtype
        self.rotate_half = _rotate_half(self.head_dim)
        self.qkv: list[Product] = []
        self.out: list[Product] = []
        self.gate_up: list[Product] = []
        self.down: list[Product] = []
        self.norm1: list[torch.Tensor] = []
        self.norm2: list[torch.Tensor] = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.qkv.append(fused_product([attn.q_proj, attn.k_proj, attn.v_proj], dtype))
            self.out.append(fused_product([attn.o_proj], dtype))
            self.gate_up.append(fused_product([mlp.gate_proj, mlp.up_proj], dtype))
            self.down.append(fused_product([mlp.down_proj], dtype))
            self.norm1.append(layer.input_layernorm.weight.detach().float())
            self.norm2.append(layer.post_attention_layernorm.weight.detach().float())

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights one step reads (products and norms; not the output head)."""
        products = [*self.qkv, *self.out, *self.gate_up, *self.down]
        norms = [*self.norm1, *self.norm2, self.norm_weight]
        return sum(p.nbytes for p in products) + sum(n.numel() * 4 for n in norms)

    def start(self, cache: Any, length: int, max_len: int) -> StepCache:
        """A static cache with room for `max_len` tokens in all, holding the prompt's
        keys/values (a Hugging Face `DynamicCache`). Each caller keeps its own, so several
        answers can be decoded in turn on one model."""
        if length > max_len:
            raise ValueError(f"prompt of {length} tokens does not fit a cache of {max_len}")
        # (layers, kv heads, max_len, hd): one sequence, so no batch dimension.
        shape = (self.layers, self.kv_heads, max_len, self.head_dim)
        state = StepCache(torch.zeros(shape), torch.zeros(shape), length)
        for i, layer in enumerate(cache.layers):
            state.keys[i, :, :length] = layer.keys[0, :, :length].float()
            state.values[i, :, :length] = layer.values[0, :, :length].float()
        return state

    def _rotation(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """(hd, hd) R with q @ R = q·cos + rotate_half(q)·sin at position `pos`: the rotary
        embedding of every head as one product per layer instead of six small ops."""
        cos, sin = self.rotary(x[None], torch.tensor([[pos]]))
        cos, sin = cos.reshape(-1).float(), sin.reshape(-1).float()  # (hd,)
        return torch.diag(cos) + self.rotate_half * sin

    @torch.no_grad()
    def step(self, x: torch.Tensor, cache: StepCache) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (1, d) float32 input embedding of the next token; `cache` (from `start`) gains
        its keys/values."""
        pos = cache.length
        if pos >= cache.keys.shape[2]:
            raise ValueError(f"the static cache holds {cache.keys.shape[2]} tokens; it is full")
        h, kv, hd, d = self.heads, self.kv_heads, self.head_dim, x.shape[-1]
        group = h // kv
        rotation = self._rotation(x, pos)
        scale = hd**-0.5
        selected = x
        for i in range(self.layers):
            qkv = self.qkv[i](torch.rms_norm(x, (d,), self.norm1[i], self.eps))  # (1, (h + 2kv)·hd)
            qk = torch.mm(qkv[0, : (h + kv) * hd].view(h + kv, hd), rotation)  # (h + kv, hd), rotated
            cache.keys[i, :, pos] = qk[h:]
            cache.values[i, :, pos] = qkv[0, (h + kv) * hd :].view(kv, hd)
            keys, values = cache.keys[i, :, : pos + 1], cache.values[i, :, : pos + 1]  # (kv, L, hd)
            # Grouped-query attention of one query: query head j reads key/value head j // group.
            scores = torch.bmm(qk[:h].view(kv, group, hd), keys.transpose(1, 2)).mul_(scale)  # (kv, group, L)
            attn = torch.bmm(torch.softmax(scores, -1), values)  # (kv, group, hd)
            x = x + self.out[i](attn.view(1, h * hd))
            gate_up = self.gate_up[i](torch.rms_norm(x, (d,), self.norm2[i], self.eps))
            x = x + self.down[i](F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter :])
            if i + 1 == self.ret_layer:
                selected = x
        cache.length = pos + 1
        return (
            torch.rms_norm(x, (d,), self.norm_weight, self.eps),
            torch.rms_norm(selected, (d,), self.norm_weight, self.eps),
        )
