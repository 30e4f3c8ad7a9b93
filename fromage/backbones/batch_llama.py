"""One lean forward for many sequences at once: each either decodes its next token or reads a
whole prompt (continuous batching's engine step), over a key/value cache of fixed slots.

Batched decoding through the Hugging Face layers spends one forward on each new prompt and one
on the running rows' step, each with ~55 ms of per-forward cost on 2 cores beyond the products
(BENCHMARKS.md, issue #17), and its cache is one left-padded tensor that a joining or leaving
row copies whole. Here every sequence owns a *slot* (a row of the cache buffers, its keys and
values from column 0): a row that leaves frees its slot, one that joins takes a free slot and
its prompt runs in the same forward as the other rows' step. Products run on all tokens of
all sequences at once, (N, d); only attention is per sequence, padded to (slots, longest
chunk) over the slots' first columns (a view of the buffers, no copy).

The arithmetic is the lean step's (backbones/fast_llama.py: fused products, the rotary
embedding as a (hd × hd) rotation per token, RMSNorm); `tests/test_batch_llama.py` checks it
against the Hugging Face model and the decoding built on it against one-at-a-time decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fast_llama import LlamaStepper


@dataclass
class Chunk:
    """`count` consecutive tokens of the sequence in `slot`, at positions start … start+count-1."""

    slot: int
    start: int
    count: int


class SlotCache:
    """Keys and values of up to `slots` sequences, each from column 0 of its slot:
    (layers, slots, kv heads, capacity, hd) float32. Grows (one copy, doubling) when a chunk
    needs more slots or columns than it has."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, slots: int = 4, capacity: int = 256):
        shape = (layers, slots, kv_heads, capacity, head_dim)
        self.keys, self.values = torch.zeros(shape), torch.zeros(shape)

    @property
    def slots(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def reserve(self, slots: int, columns: int) -> None:
        """Room for slots 0 … slots-1 and columns 0 … columns-1 (the filled part is kept)."""
        if slots <= self.slots and columns <= self.capacity:
            return
        new_slots, new_columns = self.slots, self.capacity
        while new_slots < slots:
            new_slots *= 2
        while new_columns < columns:
            new_columns *= 2
        shape = (self.keys.shape[0], new_slots, self.keys.shape[2], new_columns, self.keys.shape[4])
        keys, values = torch.zeros(shape), torch.zeros(shape)
        keys[:, : self.slots, :, : self.capacity] = self.keys
        values[:, : self.slots, :, : self.capacity] = self.values
        self.keys, self.values = keys, values


class LlamaBatchStepper:
    """The lean step of `stepper`'s model (its fused weights, shared, not copied) for many
    sequences: `forward(x, chunks, cache)` runs each chunk's tokens and returns, for each
    chunk's last token, (last hidden, `ret_layer` hidden), both after the final norm."""

    def __init__(self, stepper: LlamaStepper):
        self.s = stepper

    def new_cache(self, slots: int = 4, capacity: int = 256) -> SlotCache:
        return SlotCache(self.s.layers, self.s.kv_heads, self.s.head_dim, slots, capacity)

    def _rotations(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(N, hd, hd) R_n with q @ R_n = the rotary embedding of q at positions[n]."""
        cos, sin = self.s.rotary(x[None], positions[None])  # (1, N, hd) each
        cos, sin = cos[0].float(), sin[0].float()
        return torch.diag_embed(cos) + self.s.rotate_half[None] * sin[:, None, :]

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, chunks: Sequence[Chunk], cache: SlotCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, d) float32 input embeddings of every chunk's tokens, chunk after chunk (N =
        the sum of counts); at most one chunk per slot, each starting where its slot's cache
        ends (start 0 for a new prompt). → ((C, d), (C, d)) for the C chunks' last tokens."""
        s = self.s
        if sum(c.count for c in chunks) != x.shape[0]:
            raise ValueError(
                f"{x.shape[0]} input rows but the chunks hold {sum(c.count for c in chunks)} tokens"
            )
        if len({c.slot for c in chunks}) != len(chunks):
            raise ValueError("two chunks in one slot: a slot decodes one sequence at a time")
        if any(c.count < 1 for c in chunks):
            raise ValueError("every chunk needs at least one token")
        h, kv, hd, d = s.heads, s.kv_heads, s.head_dim, x.shape[-1]
        group = h // kv
        width = 1 + max(c.slot for c in chunks)  # attention runs over slots 0 … width-1
        longest = max(c.count for c in chunks)
        columns = max(c.start + c.count for c in chunks)
        cache.reserve(width, columns)

        # Where each token goes: its slot, its position, its row in the padded (width, longest) layout.
        slot_of = torch.cat([torch.full((c.count,), c.slot) for c in chunks])
        offset = torch.cat([torch.arange(c.count) for c in chunks])
        positions = torch.cat([torch.arange(c.start, c.start + c.count) for c in chunks])
        # Query row q of slot b sees key columns j <= start_b + q; padding rows (and idle
        # slots) see column 0 only, so no softmax row is empty (their outputs are dropped).
        start = torch.zeros(width, dtype=torch.long)
        count = torch.zeros(width, dtype=torch.long)
        for c in chunks:
            start[c.slot], count[c.slot] = c.start, c.count
        q_index = torch.arange(longest)[None, :]  # (1, longest)
        last_seen = torch.where(q_index < count[:, None], start[:, None] + q_index, torch.zeros_like(q_index))
        visible = torch.arange(columns)[None, None, :] <= last_seen[:, :, None]  # (width, longest, columns)
        bias = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
        bias = bias[:, None, None]  # (width, 1, 1, longest, columns): every kv head and group
        rotations = self._rotations(x, positions)
        scale = hd**-0.5
        last = torch.tensor([sum(c.count for c in chunks[: i + 1]) - 1 for i in range(len(chunks))])
        selected = x[last]
        for i in range(s.layers):
            qkv = s.qkv[i](torch.rms_norm(x, (d,), s.norm1[i], s.eps))  # (N, (h + 2kv)·hd)
            qk = torch.bmm(qkv[:, : (h + kv) * hd].view(-1, h + kv, hd), rotations)  # (N, h + kv, hd)
            cache.keys[i, slot_of, :, positions] = qk[:, h:]
            cache.values[i, slot_of, :, positions] = qkv[:, (h + kv) * hd :].view(-1, kv, hd)
            queries = x.new_zeros(width, longest, h, hd)
            queries[slot_of, offset] = qk[:, :h]
            # (width, kv, group·longest, hd): query head j reads key/value head j // group.
            queries = queries.view(width, longest, kv, group, hd).permute(0, 2, 3, 1, 4)
            queries = queries.reshape(width, kv, group * longest, hd)
            keys = cache.keys[i, :width, :, :columns]  # (width, kv, columns, hd), a view
            values = cache.values[i, :width, :, :columns]
            scores = torch.matmul(queries, keys.transpose(-1, -2)).mul_(scale)
            scores = scores.view(width, kv, group, longest, columns).add_(bias)
            attn = torch.matmul(torch.softmax(scores, -1).view(width, kv, group * longest, columns), values)
            attn = attn.view(width, kv, group, longest, hd).permute(
                0, 3, 1, 2, 4
            )  # (width, longest, kv, group, hd)
            x = x + s.out[i](attn[slot_of, offset].reshape(-1, h * hd))
            gate_up = s.gate_up[i](torch.rms_norm(x, (d,), s.norm2[i], s.eps))
            x = x + s.down[i](F.silu(gate_up[:, : s.inter]) * gate_up[:, s.inter :])
            if i + 1 == s.ret_layer:
                selected = x[last]
        return (
            torch.rms_norm(x[last], (d,), s.norm_weight, s.eps),
            torch.rms_norm(selected, (d,), s.norm_weight, s.eps),
        )
