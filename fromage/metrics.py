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
    return masked_recall_at_k(scores, correct, ks)


def masked_recall_at_k(
    scores: torch.Tensor, correct: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall with any number of correct items per query: (Q, N) scores and a (Q, N) bool mask.
    A query is a hit at k when fewer than k wrong items score at least its best correct one."""
    if correct.shape != scores.shape:
        raise ValueError(f"scores are {tuple(scores.shape)} but the mask is {tuple(correct.shape)}")
    if not bool(correct.any(1).all()):
        raise ValueError(f"query {int((~correct.any(1)).nonzero()[0])} has no correct item")
    best_correct = scores.masked_fill(~correct, float("-inf")).max(1).values  # (Q,)
    wrong_above = ((scores >= best_correct[:, None]) & ~correct).sum(1)
    return {f"R@{k}": float((wrong_above < k).float().mean()) for k in ks}


def visdial_ndcg(scores: torch.Tensor, relevance: torch.Tensor) -> float:
    """NDCG as the official VisDial evaluation computes it, from (R, N) option scores and (R, N)
    dense relevance (N = 100 there), averaged over rounds.

    Per round, k = number of options with non-zero relevance; the DCG of the model's top k
    (gain = relevance, discount log2(position + 1), positions from 1) over the DCG of the ideal
    top k. Cutting at k is the official choice: a round whose relevance sits in one option scores
    1 when that option is first and 0 anywhere else.

    Ties: the official code orders tied options however torch.sort returns them, which is
    unspecified (100 equal scores come back neither in index order nor reversed). We put the less
    relevant option first among ties, the rule of this module, so a constant scorer gets the worst
    NDCG; without ties the result is the official one.
    """
    if scores.dim() != 2 or scores.shape != relevance.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} and relevance {tuple(relevance.shape)} must both be (rounds, options)"
        )
    relevance = relevance.to(scores.device, torch.float64)
    if (relevance < 0).any():
        raise ValueError("relevance must be non-negative")
    num_relevant = (relevance != 0).sum(1)  # (R,) the k of each round
    if (num_relevant == 0).any():
        round_index = int((num_relevant == 0).nonzero()[0])
        raise ValueError(f"round {round_index} has no relevant option, so its NDCG is 0/0")
    # Rank by score, breaking ties by relevance ascending: stable-sort by relevance, then by score.
    by_relevance = relevance.argsort(dim=1, stable=True)  # (R, N)
    by_score = scores.gather(1, by_relevance).argsort(dim=1, descending=True, stable=True)
    ranking = by_relevance.gather(1, by_score)  # (R, N) option indices, best first
    positions = torch.arange(scores.shape[1], device=scores.device)
    discount = 1.0 / torch.log2(positions.double() + 2)  # (N,)
    in_top_k = positions[None, :] < num_relevant[:, None]  # (R, N)
    dcg = (relevance.gather(1, ranking) * discount * in_top_k).sum(1)
    ideal = (relevance.sort(dim=1, descending=True).values * discount * in_top_k).sum(1)
    return float((dcg / ideal).mean())
