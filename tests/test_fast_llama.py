import pytest
import torch

from fromage.backbones.fast_llama import supports
from fromage.generate import GenerationConfig

from .conftest import build_model, tiny_gpt2, tiny_llama, tiny_opt
from .test_generate import _run


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("ret_layer", [1, -1])
def test_fast_llama_step_equals_the_hugging_face_path(tied, ret_layer, special):
    """The lean step (float32 weights) against HF's own cached decoding, token for token,
    `[RET]` states included."""
    model = build_model(tiny_llama(tied=tied, layers=3), ret_layer=ret_layer).eval()
    config = GenerationConfig(max_new_tokens=12, ret_scale_factor=1e4, min_word_tokens=3, max_rets=2)
    reference = _run(model, special, config, use_cache=True)
    assert model.lm.enable_fast_decode(model.config.ret_layer, torch.float32)
    fast = _run(model, special, config, use_cache=True)
    assert [s.token_id for s in fast] == [s.token_id for s in reference]
    assert sum(s.ret_hidden is not None for s in fast) == 2
    for a, b in zip(fast, reference, strict=True):
        if b.ret_hidden is not None:
            torch.testing.assert_close(a.ret_hidden, b.ret_hidden, atol=1e-4, rtol=1e-4)
    # Recomputation never uses the step.
    assert [s.token_id for s in _run(model, special, config, use_cache=False)] == [
        s.token_id for s in reference
    ]


def test_fast_llama_step_in_bfloat16_stays_close(special):
    model = build_model(tiny_llama(tied=True, layers=3), ret_layer=2).eval()
    config = GenerationConfig(max_new_tokens=6, max_rets=0)
    reference = _run(model, special, config, use_cache=True)
    model.lm.store_weights_bf16()
    assert model.lm.enable_fast_decode(model.config.ret_layer, torch.bfloat16)
    stepper = model.lm.stepper
    assert stepper.qkv[0].dtype == torch.bfloat16
    fast = _run(model, special, config, use_cache=True)
    assert len(fast) == len(reference)
    assert fast[0].token_id == reference[0].token_id  # the first step after the same prefill


def test_other_architectures_keep_the_hugging_face_path(special):
    for lm in (tiny_opt(), tiny_gpt2()):
        model = build_model(lm, ret_layer=1).eval()
        assert not supports(model.lm.model)
        assert not model.lm.enable_fast_decode(1)
        assert len(_run(model, special, GenerationConfig(max_new_tokens=4, max_rets=0), use_cache=True)) == 4
