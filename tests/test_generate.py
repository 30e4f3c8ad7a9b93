import math

import pytest
import torch

from fromage.generate import GenerationConfig, choose, decode, next_token_scores
from fromage.tokens import IMAGE_TOKEN_ID

from .conftest import build_model, tiny_gpt2, tiny_llama, tiny_opt


def _prompt(model, k: int = 2):
    """`text [img] text [img] text`: two images interleaved with text."""
    ids = [1, 5, 6, *[IMAGE_TOKEN_ID] * k, 7, 8, *[IMAGE_TOKEN_ID] * k, 9]
    torch.manual_seed(3)
    return torch.tensor([ids]), torch.randn(2, model.config.feature_dim)


def _run(model, special, config, use_cache, seed=None):
    ids, feats = _prompt(model)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return list(decode(model, ids, feats, special, config, generator, use_cache=use_cache))


@pytest.mark.parametrize(
    "lm", [lambda: tiny_llama(tied=False), lambda: tiny_llama(tied=True), tiny_opt, tiny_gpt2]
)
def test_cached_decoding_equals_full_recomputation(lm, special):
    model = build_model(lm(), ret_layer=1).eval()
    # A large [RET] scale makes the test exercise the [RET] step and its hidden state too.
    config = GenerationConfig(max_new_tokens=12, ret_scale_factor=1e4, min_word_tokens=3, max_rets=2)
    fast = _run(model, special, config, use_cache=True)
    slow = _run(model, special, config, use_cache=False)
    assert [s.token_id for s in fast] == [s.token_id for s in slow]
    assert sum(s.token_id == model.ret_token_id for s in fast) == 2
    for a, b in zip(fast, slow, strict=True):
        assert (a.ret_hidden is None) == (b.ret_hidden is None)
        if a.ret_hidden is not None:
            torch.testing.assert_close(a.ret_hidden, b.ret_hidden, atol=1e-4, rtol=1e-4)


def test_sampling_is_reproducible_and_matches_the_naive_twin(special):
    model = build_model(tiny_llama()).eval()
    config = GenerationConfig(max_new_tokens=10, temperature=0.9, top_p=0.8)
    first = [s.token_id for s in _run(model, special, config, True, seed=5)]
    again = [s.token_id for s in _run(model, special, config, True, seed=5)]
    naive = [s.token_id for s in _run(model, special, config, False, seed=5)]
    assert first == again == naive


def test_ret_scale_multiplies_the_probability_even_for_negative_logits():
    model = build_model().eval()
    ret = model.ret_token_id
    logits = torch.randn(1, ret + 1)
    logits[0, ret] = -4.0  # a negative logit: scaling it would *lower* the chance
    base = torch.softmax(logits, -1)
    for scale in (0.5, 3.0, 50.0):
        got = next_token_scores(model, logits, GenerationConfig(ret_scale_factor=scale), True).exp()
        want = base.clone()
        want[0, ret] *= scale
        torch.testing.assert_close(got, want / want.sum(), atol=1e-6, rtol=1e-5)
    blocked = next_token_scores(model, logits, GenerationConfig(), allow_ret=False)
    assert blocked[0, ret] == -math.inf and torch.isclose(blocked.exp().sum(), torch.tensor(1.0))


def test_ret_limits_are_respected(special):
    model = build_model(tiny_llama()).eval()
    config = GenerationConfig(max_new_tokens=10, ret_scale_factor=1e6, min_word_tokens=4, max_rets=1)
    tokens = [s.token_id for s in _run(model, special, config, True)]
    assert tokens.index(model.ret_token_id) == 4 and tokens.count(model.ret_token_id) == 1
    none = GenerationConfig(max_new_tokens=10, ret_scale_factor=1e6, max_rets=0)
    assert model.ret_token_id not in [s.token_id for s in _run(model, special, none, True)]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    config = GenerationConfig(temperature=1.0, top_p=0.75)
    picks = {int(choose(logp, config, generator)) for _ in range(300)}
    assert picks == {0, 1}
    tiny = GenerationConfig(temperature=1.0, top_p=1e-6)
    assert {int(choose(logp, tiny, generator)) for _ in range(50)} == {0}


def test_bad_prompts_are_refused(special):
    model = build_model().eval()
    with pytest.raises(ValueError, match="empty"):
        list(decode(model, torch.zeros(1, 0, dtype=torch.long), None, special))
    with pytest.raises(ValueError, match=r"one prompt of shape \(1, T\)"):
        list(decode(model, torch.ones(2, 3, dtype=torch.long), None, special))
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=-1)


def test_a_tiny_temperature_samples_the_top_token_instead_of_failing():
    """Found by the schema fuzzer: temperature 1e-300 made every logit -inf and softmax NaN, so
    `torch.multinomial` raised (a 500 from the server)."""
    logp = torch.log_softmax(torch.tensor([[0.5, 2.0, -1.0, 1.5]]), dim=-1)
    for temperature in (1e-300, 5e-324, 1e-30):
        picked = choose(
            logp, GenerationConfig(temperature=temperature, top_p=0.9), torch.Generator().manual_seed(0)
        )
        assert picked.tolist() == [1]
