import pytest
import torch

from fromage.embed import ret_hidden_batch
from fromage.scoring import candidate_logprobs, candidate_logprobs_naive, shared_candidate_logprobs
from fromage.tokens import IMAGE_TOKEN_ID

from .conftest import build_model, tiny_gpt2, tiny_llama, tiny_opt

CANDIDATES = [[5], [7, 8, 9], [10, 11], [12], [7, 8]]  # mixed lengths, shared prefixes


@pytest.mark.parametrize("lm", [lambda: tiny_llama(tied=False), tiny_opt, tiny_gpt2])
def test_cached_candidate_scoring_matches_the_naive_twin(lm):
    model = build_model(lm()).eval()
    ids = torch.tensor([[1, 5, *[IMAGE_TOKEN_ID] * 2, 6, 7]])
    feats = torch.randn(1, model.config.feature_dim)
    fast = candidate_logprobs(model, ids, feats, CANDIDATES)
    slow = candidate_logprobs_naive(model, ids, feats, CANDIDATES)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    assert fast[1] < fast[4]  # a longer candidate adds a negative log-probability


def test_candidate_scores_use_the_causal_shift():
    """A one-token candidate is scored by the prompt's *last* position, not its own."""
    model = build_model().eval()
    ids = torch.tensor([[1, 5, 6]])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    expected = torch.log_softmax(logits.float(), -1)[9]
    assert float(candidate_logprobs(model, ids, None, [[9]])[0]) == pytest.approx(float(expected), abs=1e-5)


def test_empty_candidate_is_refused():
    model = build_model().eval()
    with pytest.raises(ValueError, match="candidate 1 has no tokens"):
        candidate_logprobs(model, torch.tensor([[1, 5]]), None, [[5], []])


def test_batched_ret_states_equal_one_prompt_at_a_time():
    model = build_model(ret_layer=1).eval()
    k = model.config.num_visual_tokens
    rows = [[1, 5, 6], [1, *[IMAGE_TOKEN_ID] * k, 7, 8, 9, 10], [1, 4]]
    feats = [None, torch.randn(1, model.config.feature_dim), None]
    batched = ret_hidden_batch(model, rows, feats, pad_id=0)
    for i, (row, f) in enumerate(zip(rows, feats, strict=True)):
        alone = ret_hidden_batch(model, [row], [f], pad_id=0)
        torch.testing.assert_close(batched[i], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lm", [lambda: tiny_llama(tied=True), tiny_opt])
def test_shared_candidates_over_a_padded_batch_match_the_naive_twin(lm):
    model = build_model(lm()).eval()
    k = model.config.num_visual_tokens
    rows = [[1, 5, 6], [1, *[IMAGE_TOKEN_ID] * k, 7, 8, 9, 10], [1, 4, *[IMAGE_TOKEN_ID] * k]]
    torch.manual_seed(4)
    feats = [None, torch.randn(1, model.config.feature_dim), torch.randn(1, model.config.feature_dim)]
    batched = shared_candidate_logprobs(model, rows, feats, CANDIDATES, pad_id=0)
    assert batched.shape == (3, len(CANDIDATES))
    for i, (row, f) in enumerate(zip(rows, feats, strict=True)):
        naive = candidate_logprobs_naive(model, torch.tensor([row]), f, CANDIDATES)
        torch.testing.assert_close(batched[i], naive, atol=1e-4, rtol=1e-4)
