"""Retrieval scoring shared by the benchmarks: exclusions, recall, and the frozen-encoder
baseline (DESIGN §5: each table shows the model next to what its encoder does alone)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..metrics import group_recall_at_k, mean_reciprocal_rank, recall_at_k
from .engine import cosine_scores

KS = (1, 5, 10)


def exclude(scores: torch.Tensor, rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """(Q, N) scores with gallery items rows[q] (e.g. a story's own context images) set to -inf."""
    out = scores.clone()
    for q, banned in enumerate(rows):
        if banned:
            out[q, list(banned)] = float("-inf")
    return out


def retrieval_metrics(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float | None]:
    """One correct gallery item per query: R@1/5/10 and MRR (ties count against the model)."""
    return {**recall_at_k(scores, targets, KS), "MRR": mean_reciprocal_rank(scores, targets)}


def group_metrics(
    scores: torch.Tensor, query_groups: Sequence[str], gallery_groups: Sequence[str]
) -> dict[str, float | None]:
    """Any gallery item of the query's group is correct ("any red circle")."""
    return dict(group_recall_at_k(scores, query_groups, gallery_groups, KS))


def mean_context_baseline(
    context_features: Sequence[torch.Tensor], gallery_features: torch.Tensor
) -> torch.Tensor:
    """The frozen encoder alone, for queries whose context holds images: the mean of the
    context images' pooled features, ranked by cosine against the gallery's.
    context_features: per query an (n_q, F) tensor with n_q >= 1. → (Q, N) scores."""
    if any(c.shape[0] == 0 for c in context_features):
        raise ValueError("the mean-of-context baseline needs at least one context image per query")
    means = torch.stack([c.float().mean(0) for c in context_features])
    return cosine_scores(means, gallery_features)


NO_TEXT_TOWER = "the frozen image encoder has no text tower: it cannot rank from text alone"
