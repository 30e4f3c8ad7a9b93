"""Ranking metrics. Pure functions; imports nothing from the package.

Ties count against the model: a target that shares its score with another candidate ranks
below it, so a constant scorer gets recall 0, not 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(Q, N) scores, (Q,) target column per query → (Q,) 0-based rank of each target."""
    if scores.shape[0] != targets.shape[0]:
        raise ValueError(f"{scores.shape[0]} score rows but {targets.shape[0]} targets")
    target_scores = scores.gather(1, targets[:, None].long())
    return (scores >= target_scores).sum(1) - 1


def recall_at_k(
    scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    ranks = target_ranks(scores, targets)
    return {f"R@{k}": float((ranks < k).float().mean()) for k in ks}


def mean_reciprocal_rank(scores: torch.Tensor, targets: torch.Tensor) -> float:
    ranks = target_ranks(scores, targets).float()
    return float((1.0 / (ranks + 1)).mean())


def group_recall_at_k(
    scores: torch.Tensor,
    query_groups: Sequence[str],
    gallery_groups: Sequence[str],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall where any gallery item of the query's group is correct ("a red circle" matches
    every red circle). (Q, N) scores; ties count against the model."""
    gallery_index: dict[str, list[int]] = {}
    for j, g in enumerate(gallery_groups):
        gallery_index.setdefault(g, []).append(j)
    correct = torch.zeros_like(scores, dtype=torch.bool)
    for i, g in enumerate(query_groups):
        if g not in gallery_index:
            raise ValueError(f"query {i} has group {g!r} with no item in the gallery")
        correct[i, gallery_index[g]] = True
    best_correct = scores.masked_fill(~correct, float("-inf")).max(1).values  # (Q,)
    wrong_above = ((scores >= best_correct[:, None]) & ~correct).sum(1)
    return {f"R@{k}": float((wrong_above < k).float().mean()) for k in ks}
