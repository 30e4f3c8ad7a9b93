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


def _bias(visible: torch.Tensor) -> torch.Tensor:
    """0 where visible, -inf elsewhere (float32)."""
    return torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))


@dataclass
class Chunk:
    """`count` consecutive tokens of the sequence in `slot`, at positions start … start+count-1."""

    slot: int
    start: int
    count: int


class SlotCache:
    """Keys and values of up to `slots` sequences, each from column 0 of its slot:
    (layers, slots, kv heads, capacity, hd) float32. Grows (one copy, doubling, up to `limit`
    columns) when a chunk needs more slots or columns than it has; `fit` gives memory back once
    far more is held than used."""

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, slots: int = 4, capacity: int = 256, limit: int = 0
    ):
        self.keys, self.values = self._zeros(layers, kv_heads, head_dim, slots, capacity)
        self.filled = [0] * slots
        """Columns each slot has written (what `clear` zeroes)."""
        self.least = (slots, capacity)
        """The size `fit` never goes below."""
        self.limit = limit
        """The most columns a slot needs (the model's context), 0 = no limit."""

    @staticmethod
    def _zeros(layers: int, kv: int, hd: int, slots: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Zeros, not empty: masked columns are still multiplied by their weight 0, so they must be finite.
        shape = (layers, slots, kv, columns, hd)
        return torch.zeros(shape), torch.zeros(shape)

    @property
    def slots(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def _resize(self, slots: int, columns: int) -> None:
        """New buffers of (slots, columns), holding what fits of the old ones."""
        layers, _, kv, _, hd = self.keys.shape
        keys, values = self._zeros(layers, kv, hd, slots, columns)
        s, c = min(slots, self.slots), min(columns, self.capacity)
        keys[:, :s, :, :c] = self.keys[:, :s, :, :c]
        values[:, :s, :, :c] = self.values[:, :s, :, :c]
        self.keys, self.values = keys, values
        self.filled = [min(f, columns) for f in self.filled[:slots]] + [0] * max(0, slots - len(self.filled))

    def clear(self, slot: int) -> None:
        """Zero what a slot's last sequence wrote, before another takes it: a new sequence reads
        (with weight 0) the columns other rows reach, and 0 × a non-finite left there is NaN."""
        if slot < self.slots and self.filled[slot]:
            self.keys[:, slot, :, : self.filled[slot]] = 0
            self.values[:, slot, :, : self.filled[slot]] = 0
            self.filled[slot] = 0

    def reserve(self, slots: int, columns: int) -> None:
        """Room for slots 0 … slots-1 and columns 0 … columns-1 (the filled part is kept)."""
        if slots <= self.slots and columns <= self.capacity:
            return
        new_slots, new_columns = self.slots, self.capacity
        while new_slots < slots:
            new_slots *= 2
        if new_columns < columns:
            new_columns = max(columns, 2 * new_columns)
            if self.limit:
                new_columns = max(columns, min(new_columns, self.limit))
        self._resize(new_slots, new_columns)

    def fit(self, slots: int, columns: int) -> None:
        """Give memory back when more than 4× the `slots` and `columns` in use (or the starting
        size, if more) is held: keep twice that. Hysteresis, so a steady load does not copy."""
        want_slots, want_columns = max(slots, self.least[0]), max(columns, self.least[1])
        if self.slots > 4 * want_slots or self.capacity > 4 * want_columns:
            self._resize(min(self.slots, 2 * want_slots), min(self.capacity, 2 * want_columns))


class LlamaBatchStepper:
    """The lean step of `stepper`'s model (its fused weights, shared, not copied) for many
    sequences: `forward(x, chunks, cache)` runs each chunk's tokens and returns, for each
    chunk's last token, (last hidden, `ret_layer` hidden), both after the final norm."""

    def __init__(self, stepper: LlamaStepper):
        self.s = stepper

    def new_cache(self, slots: int = 4, capacity: int = 256, limit: int = 0) -> SlotCache:
        return SlotCache(self.s.layers, self.s.kv_heads, self.s.head_dim, slots, capacity, limit)

    def _rotations(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(N, hd, hd) R_n with q @ R_n = the rotary embedding of q at positions[n]."""
        cos, sin = self.s.rotary(x[None], positions[None])  # (1, N, hd) each
        cos, sin = cos[0].float(), sin[0].float()
        return torch.diag_embed(cos) + self.s.rotate_half[None] * sin[:, None, :]

    def _attend(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """(B, kv, q, hd) queries over (B, kv, L, hd) keys/values with an additive (…, q or 1, L)
        bias → (B, kv, q, hd)."""
        scores = torch.matmul(queries, keys.transpose(-1, -2)).mul_(self.s.head_dim**-0.5).add_(bias)
        return torch.matmul(torch.softmax(scores, -1), values)

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
        cache.reserve(1 + max(c.slot for c in chunks), max(c.start + c.count for c in chunks))
        for c in chunks:
            cache.filled[c.slot] = max(cache.filled[c.slot], c.start + c.count)
        slot_of = torch.cat([torch.full((c.count,), c.slot) for c in chunks])
        positions = torch.cat([torch.arange(c.start, c.start + c.count) for c in chunks])
        first = [sum(c.count for c in chunks[:i]) for i in range(len(chunks))]  # each chunk's first row of x
        last = torch.tensor([f + c.count - 1 for f, c in zip(first, chunks, strict=True)])
        # Attention in groups, so no sequence pays for another's length: every one-token chunk
        # (a decoding row) together, over the slots up to the highest of them; each longer
        # chunk (a prompt) alone, over its own columns.
        steps = [(f, c) for f, c in zip(first, chunks, strict=True) if c.count == 1]
        prompts = [(f, c) for f, c in zip(first, chunks, strict=True) if c.count > 1]
        step_rows = torch.tensor([f for f, _ in steps], dtype=torch.long)
        step_slots = torch.tensor([c.slot for _, c in steps], dtype=torch.long)
        width = 1 + max((c.slot for _, c in steps), default=-1)
        step_columns = 1 + max((c.start for _, c in steps), default=0)
        # Slot b's query sees columns j <= its position; idle slots see column 0 only (no
        # softmax row is empty; their outputs are dropped).
        seen = torch.zeros(width, dtype=torch.long)
        seen[step_slots] = torch.tensor([c.start for _, c in steps], dtype=torch.long)
        visible = torch.arange(step_columns)[None, :] <= seen[:, None]
        step_bias = _bias(visible)[:, None, None, :]  # (width, 1, 1, cols)
        prompt_bias = [
            _bias(
                torch.arange(c.start + c.count)[None, :] <= torch.arange(c.start, c.start + c.count)[:, None]
            )
            for _, c in prompts
        ]  # (count, start + count) each: causal
        rotations = self._rotations(x, positions)
        selected = x[last]
        for i in range(s.layers):
            qkv = s.qkv[i](torch.rms_norm(x, (d,), s.norm1[i], s.eps))  # (N, (h + 2kv)·hd)
            qk = torch.bmm(qkv[:, : (h + kv) * hd].view(-1, h + kv, hd), rotations)  # (N, h + kv, hd)
            cache.keys[i, slot_of, :, positions] = qk[:, h:]
            cache.values[i, slot_of, :, positions] = qkv[:, (h + kv) * hd :].view(-1, kv, hd)
            attn = x.new_empty(x.shape[0], h * hd)
            if steps:
                queries = x.new_zeros(width, h, hd)
                queries[step_slots] = qk[step_rows, :h]
                out = self._attend(
                    queries.view(
                        width, kv, -1, hd
                    ),  # (width, kv, group, hd): head j reads kv head j // group
                    cache.keys[i, :width, :, :step_columns],  # (width, kv, cols, hd), a view
                    cache.values[i, :width, :, :step_columns],
                    step_bias,
                )
                attn[step_rows] = out[step_slots].reshape(-1, h * hd)
            for (f, c), bias in zip(prompts, prompt_bias, strict=True):
                q = (
                    qk[f : f + c.count, :h].view(c.count, kv, -1, hd).permute(1, 2, 0, 3)
                )  # (kv, group, count, hd)
                out = self._attend(
                    q.reshape(1, kv, -1, hd),
                    cache.keys[i, c.slot : c.slot + 1, :, : c.start + c.count],
                    cache.values[i, c.slot : c.slot + 1, :, : c.start + c.count],
                    bias.repeat(q.shape[1], 1)[None, None],  # (1, 1, group·count, cols)
                )  # (1, kv, group·count, hd)
                attn[f : f + c.count] = (
                    out.view(kv, -1, c.count, hd).permute(2, 0, 1, 3).reshape(c.count, h * hd)
                )
            x = x + s.out[i](attn)
            gate_up = s.gate_up[i](torch.rms_norm(x, (d,), s.norm2[i], s.eps))
            x = x + s.down[i](F.silu(gate_up[:, : s.inter]) * gate_up[:, s.inter :])
            if i + 1 == s.ret_layer:
                selected = x[last]
        return (
            torch.rms_norm(x[last], (d,), s.norm_weight, s.eps),
            torch.rms_norm(selected, (d,), s.norm_weight, s.eps),
        )
