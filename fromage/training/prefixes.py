"""The frozen part of the retrieval pass, computed without autograd.

`[BOS] text` runs through the frozen LM with nothing trainable, so its keys/values, hidden
states and frozen-vocabulary logit statistics can be computed once per distinct text and
`[RET]` run on top each step (DESIGN §7: this made a contrastive batch of 256 cheap). When the
table would not fit in `prefix_cache_mb`, each step computes its own texts' prefixes instead
(`OnTheFlyPrefixes`): the same values, one frozen forward per step.
"""

from __future__ import annotations

import logging
import random

import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..data.collate import retrieval_prefix_batch
from ..embed import PrefixSource, ret_states
from ..model import FromageModel, TextPrefix
from ..tokens import SpecialTokens

log = logging.getLogger(__name__)


def _encode(model: FromageModel, texts: list[list[int]], special: SpecialTokens) -> TextPrefix:
    ids, mask = retrieval_prefix_batch(texts, special)
    device = model.ret_embedding.device
    return model.encode_text_prefix(ids.to(device), mask.to(device))


def precompute_prefixes(
    model: FromageModel, texts: list[list[int]], special: SpecialTokens, chunk: int = 64
) -> TextPrefix:
    """The frozen prefix of each text, computed once (row i ↔ texts[i]). Texts are run in
    length order so little compute goes to padding."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    parts = []
    for start in tqdm(range(0, len(order), chunk), desc="text prefixes", leave=False):
        parts.append(_encode(model, [texts[i] for i in order[start : start + chunk]], special))
    table = TextPrefix.cat(parts)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return table.select(inverse)


class OnTheFlyPrefixes:
    """Prefixes computed when a step asks for them (one frozen forward over the step's texts,
    still no autograd). `select` returns what the precomputed table's `select` would."""

    def __init__(self, model: FromageModel, texts: list[list[int]], special: SpecialTokens):
        self.model, self.texts, self.special = model, texts, special

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, rows: torch.Tensor) -> TextPrefix:
        return _encode(self.model, [self.texts[r] for r in rows.tolist()], self.special)


class RowSubset:
    """Some rows of a prefix source, renumbered 0..len-1."""

    def __init__(self, source: PrefixSource, rows: list[int]):
        self.source, self.rows = source, torch.tensor(rows, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, rows: torch.Tensor) -> TextPrefix:
        return self.source.select(self.rows[rows])


def prefix_table_mb(model: FromageModel, texts: list[list[int]], special: SpecialTokens) -> float:
    """Size the precomputed table would take: (texts × longest text) positions, each holding
    every layer's keys and values and a hidden state (measured on one probe row)."""
    ids, _ = retrieval_prefix_batch([min(texts, key=len)], special)
    probe = _encode(model, [min(texts, key=len)], special)
    tensors = (
        probe.mask,
        probe.predicts,
        probe.targets,
        probe.last_hidden,
        probe.frozen_lse,
        probe.frozen_target_logit,
    )
    probe_bytes = sum(t.numel() * t.element_size() for t in (*tensors, probe.keys, probe.values))
    per_position = probe_bytes / ids.shape[1]
    return per_position * len(texts) * (max(len(t) for t in texts) + 1) / 2**20


def build_prefixes(
    model: FromageModel, texts: list[list[int]], special: SpecialTokens, config: TrainConfig
) -> PrefixSource:
    """The table when it fits in `config.prefix_cache_mb`, else prefixes per step. Also sets the
    model's `[RET]`-state statistics (for standardising), from every text or a 4,096 sample."""
    table_mb = prefix_table_mb(model, texts, special)
    if table_mb <= config.prefix_cache_mb:
        table = precompute_prefixes(model, texts, special)
        model.set_text_stats(ret_states(model, table))
        return table
    log.info(
        "retrieval-pass prefixes of %d texts would take %.0f MB (prefix_cache_mb %.0f): "
        "computed in each step instead",
        len(texts),
        table_mb,
        config.prefix_cache_mb,
    )
    on_the_fly = OnTheFlyPrefixes(model, texts, special)
    sample = sorted(random.Random(config.seed).sample(range(len(texts)), min(len(texts), 4096)))
    model.set_text_stats(ret_states(model, RowSubset(on_the_fly, sample)))
    return on_the_fly
