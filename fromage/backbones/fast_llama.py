"""A lean one-token decoder step for Llama-family LMs (SmolLM2, Llama, Mistral-style GQA).

Decoding one token at a time on a CPU is bound by memory bandwidth and per-op overhead; the
Hugging Face layer stack spends ~35 ms a token (SmolLM2-135M, 2 cores) on Python and small ops
beyond the weight reads. This step does the same arithmetic with fewer, larger ops: q/k/v and
gate/up products fused into one matrix each, a preallocated key/value cache, the rotary embedding as one
(hd × hd) product, fused RMSNorm, and no wrappers; the layer loop runs as TorchScript
(`_scripted_layers`), so its ~1,000 op calls a token are dispatched from C++. Weights are kept
in float32, bfloat16 (`backbones/bf16_weights.py` explains why) or int8
(`backbones/int8_weights.py`).

It is a fast path with a naive twin: `tests/test_fast_llama.py` checks it against the Hugging
Face model token for token. Only plain Llama layers qualify (`supports`): no attention or MLP
bias, SiLU gating, RMSNorm; anything else keeps the Hugging Face path.
"""

from __future__ import annotations

import functools
import warnings
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


FLOAT, BF16, INT8 = 0, 1, 2
"""How a product's weight is held (`Product.kind`), as the scripted step reads it."""


class FloatProduct:
    """`x @ w.T` with w kept transposed, (in, out), in float32: the exact path."""

    kind = FLOAT

    def __init__(self, weight: torch.Tensor):
        self.wt = weight.detach().float().t().contiguous()
        self.held, self.scale = self.wt, torch.empty(0)

    @property
    def nbytes(self) -> int:
        return self.wt.numel() * self.wt.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (r, in) → (r, out)
        return torch.mm(x, self.wt)


class BF16Product:
    """`x @ w.T` with w (out, in) in bf16. One row is a matrix-vector product: it reads the
    weight faster than `mm` here (160 vs 192 µs for 3072×576, `bench/bandwidth.py`); up to
    `bf16_rows()` rows are a bf16 product, more upcast the weight (bf16_weights.py says why)."""

    kind = BF16

    def __init__(self, weight: torch.Tensor):
        self.w = weight.detach().float().to(torch.bfloat16).contiguous()
        self.max_rows = bf16_rows()
        self.held, self.scale = self.w, torch.empty(0)

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
        self._held: tuple[list[torch.Tensor], list[torch.Tensor], list[int]] | None = None
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
        if self._held is None:  # every product's tensors and kind, in layer order
            products = [
                p
                for i in range(self.layers)
                for p in (self.qkv[i], self.out[i], self.gate_up[i], self.down[i])
            ]
            self._held = ([p.held for p in products], [p.scale for p in products], [p.kind for p in products])
        x, selected = _scripted_layers()(
            x,
            pos,
            self._rotation(x, pos),
            cache.keys,
            cache.values,
            *self._held,
            self.norm1,
            self.norm2,
            [self.heads, self.kv_heads, self.head_dim, self.inter, self.ret_layer],
            self.eps,
        )
        cache.length = pos + 1
        d = x.shape[-1]
        return (
            torch.rms_norm(x, (d,), self.norm_weight, self.eps),
            torch.rms_norm(selected, (d,), self.norm_weight, self.eps),
        )


def _product(x: torch.Tensor, held: torch.Tensor, scale: torch.Tensor, kind: int) -> torch.Tensor:
    """(1, in) float32 → (1, out) float32 through one `Product`'s tensors (FloatProduct,
    BF16Product and Int8Product do the same for one row)."""
    if kind == 2:  # INT8: int8 rows, bf16 scales
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), held, scale).float()
    if kind == 1:  # BF16: (out, in)
        return torch.mv(held, x[0].to(torch.bfloat16))[None].float()
    return torch.mm(x, held)  # FLOAT: (in, out)


def _layers(
    x: torch.Tensor,
    pos: int,
    rotation: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    held: list[torch.Tensor],
    scales: list[torch.Tensor],
    kinds: list[int],
    norm1: list[torch.Tensor],
    norm2: list[torch.Tensor],
    sizes: list[int],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer of the lean step for one token at position `pos`: → (last, `ret_layer`)
    hidden, before the final norm. Products 4i … 4i+3 are layer i's q/k/v, output, gate/up and
    down; keys/values (layers, kv heads, max_len, hd) gain column `pos`; `sizes` = heads, kv
    heads, head dim, MLP width, ret_layer."""
    h, kv, hd, inter, ret_layer = sizes[0], sizes[1], sizes[2], sizes[3], sizes[4]
    d = x.shape[-1]
    group = h // kv
    scale = hd**-0.5
    selected = x
    for i in range(len(norm1)):
        j = 4 * i
        qkv = _product(
            torch.rms_norm(x, [d], norm1[i], eps), held[j], scales[j], kinds[j]
        )  # (1, (h + 2kv)·hd)
        qk = torch.mm(qkv[0, : (h + kv) * hd].view(h + kv, hd), rotation)  # (h + kv, hd), rotated
        keys[i, :, pos] = qk[h:]
        values[i, :, pos] = qkv[0, (h + kv) * hd :].view(kv, hd)
        k, v = keys[i, :, : pos + 1], values[i, :, : pos + 1]  # (kv, L, hd)
        # Grouped-query attention of one query: query head j reads key/value head j // group.
        scores = torch.bmm(qk[:h].view(kv, group, hd), k.transpose(1, 2)).mul_(scale)  # (kv, group, L)
        attn = torch.bmm(torch.softmax(scores, -1), v)  # (kv, group, hd)
        x = x + _product(attn.view(1, h * hd), held[j + 1], scales[j + 1], kinds[j + 1])
        gate_up = _product(torch.rms_norm(x, [d], norm2[i], eps), held[j + 2], scales[j + 2], kinds[j + 2])
        x = x + _product(
            F.silu(gate_up[:, :inter]) * gate_up[:, inter:], held[j + 3], scales[j + 3], kinds[j + 3]
        )
        if i + 1 == ret_layer:
            selected = x
    return x, selected


@functools.cache
def _scripted_layers() -> Any:
    """`_layers` compiled by TorchScript (once, on first use): the same ops, bit for bit, with
    the ~1,000 per-token op calls dispatched from C++ rather than Python. Measured 2026-12-02
    (int8 weights, 2 cores): 14.6–15.2 ms a step against 16.6–17.4 eager (BENCHMARKS.md,
    issue #17). `torch.compile` of a layer did not help (same section)."""
    try:
        return torch.jit.script(_layers)
    except Exception as error:  # e.g. an install without .py sources: the same layers, eager
        warnings.warn(f"the lean step runs eagerly: TorchScript could not compile it ({error})", stacklevel=2)
        return _layers
