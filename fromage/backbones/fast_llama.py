"""A lean one-token decoder step for Llama-family LMs (SmolLM2, Llama, Mistral-style GQA).

Decoding one token at a time on a CPU is bound by memory bandwidth and per-op overhead; the
Hugging Face layer stack spends ~35 ms a token (SmolLM2-135M, 2 cores) on Python and small ops
beyond the weight reads. This step does the same arithmetic with fewer, larger ops: q/k/v and
gate/up products fused into one matrix each, a preallocated key/value cache, and no wrappers.
Weights are kept in bfloat16 (`backbones/bf16_weights.py` explains why) or float32.

It is a fast path with a naive twin: `tests/test_fast_llama.py` checks it against the Hugging
Face model token for token. Only plain Llama layers qualify (`supports`): no attention or MLP
bias, SiLU gating, RMSNorm; anything else keeps the Hugging Face path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def supports(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", "") != "llama":
        return False
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return False
    if getattr(config, "hidden_act", "silu") != "silu":
        return False
    return hasattr(getattr(model, "model", None), "layers")


class LlamaStepper:
    """Built once per model (fused weights). `start(cache, length, max_len)` takes over a
    Hugging Face cache after a prompt; each `step(x)` then runs one token through every layer
    and returns (last hidden, layer-`ret_layer` hidden), both after the final norm, (1, d)."""

    def __init__(self, model: nn.Module, ret_layer: int, dtype: torch.dtype = torch.bfloat16):
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not a plain Llama model")
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

        def weight(linear: nn.Module) -> torch.Tensor:
            w: torch.Tensor = linear.weight.detach()  # type: ignore[assignment]
            return w.float()  # bf16-stored layers upcast here once

        self.qkv, self.out, self.gate_up, self.down, self.norm1, self.norm2 = [], [], [], [], [], []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.qkv.append(
                torch.cat([weight(attn.q_proj), weight(attn.k_proj), weight(attn.v_proj)]).to(dtype).t()
            )
            self.out.append(weight(attn.o_proj).to(dtype).t())
            self.gate_up.append(torch.cat([weight(mlp.gate_proj), weight(mlp.up_proj)]).to(dtype).t())
            self.down.append(weight(mlp.down_proj).to(dtype).t())
            self.norm1.append(layer.input_layernorm.weight.detach().float())
            self.norm2.append(layer.post_attention_layernorm.weight.detach().float())
        self.max_len = 0
        self.keys = self.values = torch.empty(0)
        self.length = 0

    def start(self, cache: Any, length: int, max_len: int) -> None:
        """Copy the prompt's keys/values (a Hugging Face `DynamicCache`) into a static cache
        with room for `max_len` tokens in all."""
        if length > max_len:
            raise ValueError(f"prompt of {length} tokens does not fit a cache of {max_len}")
        shape = (self.layers, 1, self.kv_heads, max_len, self.head_dim)
        self.keys, self.values, self.max_len = torch.zeros(shape), torch.zeros(shape), max_len
        for i, layer in enumerate(cache.layers):
            self.keys[i, :, :, :length] = layer.keys[:, :, :length].float()
            self.values[i, :, :, :length] = layer.values[:, :, :length].float()
        self.length = length

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = self.head_dim // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    def _mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # (1, in) float32 → (1, out) float32
        return torch.mm(x.to(self.dtype), w).float()

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (1, d) float32 input embedding of the next token."""
        pos = self.length
        if pos >= self.max_len:
            raise ValueError(f"the static cache holds {self.max_len} tokens; it is full")
        h, kv, hd = self.heads, self.kv_heads, self.head_dim
        cos, sin = self.rotary(x[None], torch.tensor([[pos]]))
        cos, sin = cos.float()[:, None], sin.float()[:, None]  # (1, 1, 1, hd)
        selected = x
        for i in range(self.layers):
            qkv = self._mm(self._rms(x, self.norm1[i]), self.qkv[i])
            q = self._rotate(qkv[:, : h * hd].view(1, h, 1, hd), cos, sin)
            k = self._rotate(qkv[:, h * hd : (h + kv) * hd].view(1, kv, 1, hd), cos, sin)
            self.keys[i, :, :, pos : pos + 1] = k
            self.values[i, :, :, pos : pos + 1] = qkv[:, (h + kv) * hd :].view(1, kv, 1, hd)
            attn = F.scaled_dot_product_attention(
                q, self.keys[i, :, :, : pos + 1], self.values[i, :, :, : pos + 1], enable_gqa=kv != h
            )
            x = x + self._mm(attn.reshape(1, h * hd), self.out[i])
            gate_up = self._mm(self._rms(x, self.norm2[i]), self.gate_up[i])
            x = x + self._mm(F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter :], self.down[i])
            if i + 1 == self.ret_layer:
                selected = x
        self.length = pos + 1
        return self._rms(x, self.norm_weight), self._rms(selected, self.norm_weight)
