"""Ranking metrics on hand-worked examples; ties count against the model."""

import math

import pytest
import torch

from fromage.metrics import group_recall_at_k, mean_reciprocal_rank, recall_at_k, target_ranks, visdial_ndcg

LOG2_3 = math.log2(3)


def test_target_ranks_recall_and_mrr_by_hand():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3],  # target 0 is first: rank 0
            [0.5, 0.8, 0.5, 0.1],  # target 0 is behind 0.8 and tied with column 2: rank 2
            [0.1, 0.2, 0.3, 0.4],  # target 0 is last: rank 3
        ]
    )
    targets = torch.tensor([0, 0, 0])
    assert target_ranks(scores, targets).tolist() == [0, 2, 3]
    assert recall_at_k(scores, targets, ks=(1, 2, 3, 4)) == pytest.approx(
        {"R@1": 1 / 3, "R@2": 1 / 3, "R@3": 2 / 3, "R@4": 1.0}
    )
    assert mean_reciprocal_rank(scores, targets) == pytest.approx((1 + 1 / 3 + 1 / 4) / 3)


def test_constant_scorer_gets_the_worst_rank():
    scores = torch.zeros(2, 5)
    targets = torch.tensor([0, 3])
    assert target_ranks(scores, targets).tolist() == [4, 4]
    assert recall_at_k(scores, targets, ks=(1, 4, 5)) == {"R@1": 0.0, "R@4": 0.0, "R@5": 1.0}
    assert mean_reciprocal_rank(scores, targets) == pytest.approx(1 / 5)


def test_target_ranks_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="3 score rows but 2 targets"):
        target_ranks(torch.zeros(3, 4), torch.tensor([0, 1]))


def test_group_recall_by_hand():
    gallery = ["a", "a", "b", "c"]
    scores = torch.tensor(
        [
            [0.1, 0.7, 0.7, 0.2],  # group a: best correct 0.7 is tied with the "b" item -> 1 wrong above
            [0.3, 0.2, 0.5, 0.1],  # group b: its item scores highest -> 0 wrong above
        ]
    )
    assert group_recall_at_k(scores, ["a", "b"], gallery, ks=(1, 2)) == {"R@1": 0.5, "R@2": 1.0}
    # Constant scores: for group a both wrong items tie with the right ones, so 2 are "above".
    assert group_recall_at_k(torch.zeros(1, 4), ["a"], gallery, ks=(1, 2, 3)) == {
        "R@1": 0.0,
        "R@2": 0.0,
        "R@3": 1.0,
    }
    with pytest.raises(ValueError, match="group 'z' with no item"):
        group_recall_at_k(scores, ["a", "z"], gallery)


def test_ndcg_by_hand():
    # k = 3 relevant options. The model orders options 0, 1, 3, 4, 2, so its top 3 have gains
    # 0, 1, 0 -> DCG = 1/log2(3). Ideal top 3: 1, .5, .5 -> 1 + .5/log2(3) + .5/log2(4).
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.7, 0.2]])
    relevance = torch.tensor([[0.0, 1.0, 0.5, 0.0, 0.5]])
    expected = (1 / LOG2_3) / (1 + 0.5 / LOG2_3 + 0.25)
    assert visdial_ndcg(scores, relevance) == pytest.approx(expected, rel=1e-12)
    assert visdial_ndcg(relevance, relevance) == pytest.approx(1.0)


def test_ndcg_with_all_relevance_in_one_option_is_top_1_accuracy():
    # k = 1: only the first position counts, so second place earns 0, not 1/log2(3).
    relevance = torch.tensor([[0.0, 0.0, 1.0, 0.0]] * 2)
    scores = torch.tensor([[0.1, 0.2, 0.9, 0.3], [0.1, 0.95, 0.9, 0.3]])
    assert visdial_ndcg(scores[:1], relevance[:1]) == 1.0
    assert visdial_ndcg(scores[1:], relevance[1:]) == 0.0
    assert visdial_ndcg(scores, relevance) == pytest.approx(0.5)  # mean over rounds


def test_ndcg_ties_count_against_the_model():
    # Options 1 (relevance 1) and 2 (relevance .5) tie: the less relevant goes first, so the top
    # k = 2 is options 0, 2 with gains 0, .5.
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1]])
    relevance = torch.tensor([[0.0, 1.0, 0.5, 0.0]])
    expected = (0.5 / LOG2_3) / (1 + 0.5 / LOG2_3)
    assert visdial_ndcg(scores, relevance) == pytest.approx(expected, rel=1e-12)
    # A constant scorer puts every irrelevant option first: NDCG 0 even though option 0 is relevant.
    assert visdial_ndcg(torch.zeros(1, 4), torch.tensor([[1.0, 0.0, 0.0, 0.5]])) == 0.0


def _official_ndcg(scores: torch.Tensor, relevance: torch.Tensor) -> float:
    """The VisDial starter code's NDCG written out round by round (valid when scores do not tie)."""
    total = 0.0
    for round_scores, round_relevance in zip(scores.tolist(), relevance.tolist(), strict=True):
        k = sum(r != 0 for r in round_relevance)
        model = sorted(range(len(round_scores)), key=lambda i: -round_scores[i])[:k]
        ideal = sorted(round_relevance, reverse=True)[:k]
        dcg = sum(round_relevance[i] / math.log2(pos + 2) for pos, i in enumerate(model))
        best = sum(r / math.log2(pos + 2) for pos, r in enumerate(ideal))
        total += dcg / best
    return total / len(scores)


def test_ndcg_matches_the_official_algorithm_without_ties():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(30, 100, generator=generator)
    # VisDial relevance is a fraction of 4 annotators (0, .25, ... 1) on a handful of options.
    relevance = torch.randint(0, 5, (30, 100), generator=generator) / 4
    relevance[torch.rand(30, 100, generator=generator) < 0.9] = 0
    relevance[:, 0] = 1.0  # every round has a relevant option
    assert visdial_ndcg(scores, relevance) == pytest.approx(_official_ndcg(scores, relevance), rel=1e-9)


def test_ndcg_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"scores \(2, 4\) and relevance \(2, 5\)"):
        visdial_ndcg(torch.zeros(2, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="round 1 has no relevant option"):
        visdial_ndcg(torch.zeros(2, 3), torch.tensor([[1.0, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="non-negative"):
        visdial_ndcg(torch.zeros(1, 2), torch.tensor([[1.0, -0.5]]))


def test_masked_recall_counts_any_correct_item_and_ties_against_the_model():
    from fromage.metrics import masked_recall_at_k

    scores = torch.tensor(
        [
            [0.9, 0.8, 0.1],  # correct {1}: one wrong item above -> hit at 2, not at 1
            [0.2, 0.5, 0.5],  # correct {1, 2}: best correct 0.5, no wrong item >= 0.5 -> hit at 1
            [0.5, 0.5, 0.1],  # correct {0}: the wrong item 1 ties it -> a miss at 1
        ]
    )
    correct = torch.tensor([[False, True, False], [False, True, True], [True, False, False]])
    got = masked_recall_at_k(scores, correct, ks=(1, 2))
    assert got == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="query 0 has no correct item"):
        masked_recall_at_k(scores, torch.zeros_like(correct))
    with pytest.raises(ValueError, match=r"scores are \(3, 3\) but the mask is \(3, 2\)"):
        masked_recall_at_k(scores, correct[:, :2])
