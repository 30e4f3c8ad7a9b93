import pytest
import torch

from fromage.backbones.fast_llama import BF16Product, supports
from fromage.backbones.int8_weights import Int8Product, Int8WeightLinear
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


def test_fast_llama_step_in_bfloat16_matches_rounded_weights_for_whole_answers(special):
    """The default decoding path (bf16-stored linear weights, the lean step) against its naive
    twin: the Hugging Face float32 path on the same weights rounded to bf16, token for token over
    whole answers, `[RET]` states included. (Before issue #18 only token 0 was compared, and it
    comes from the prefill, before the lean step runs.)"""
    import copy

    model = build_model(tiny_llama(tied=True, layers=3), ret_layer=2).eval()
    rounded = copy.deepcopy(model)
    for module in rounded.lm.model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.bfloat16().float()
    config = GenerationConfig(max_new_tokens=16, ret_scale_factor=1e4, min_word_tokens=3, max_rets=2)
    reference = _run(rounded, special, config, use_cache=True)
    model.lm.store_weights_bf16()
    assert model.lm.enable_fast_decode(model.config.ret_layer, torch.bfloat16)
    assert isinstance(model.lm.stepper.qkv[0], BF16Product)
    fast = _run(model, special, config, use_cache=True)
    assert [s.token_id for s in fast] == [s.token_id for s in reference]
    assert sum(s.ret_hidden is not None for s in fast) == 2
    for a, b in zip(fast, reference, strict=True):
        if b.ret_hidden is not None:
            # bf16 activations in the lean step's products: close, not equal.
            torch.testing.assert_close(a.ret_hidden, b.ret_hidden, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("tied", [False, True])
def test_fast_llama_step_in_int8_matches_dequantised_weights_for_whole_answers(tied, special):
    """Int8-stored weights (every linear layer and the head) with the lean step, against the
    naive twin: the Hugging Face float32 path on the dequantised weights, token for token over
    whole answers, `[RET]` states included."""
    import copy

    model = build_model(tiny_llama(tied=tied, layers=3), ret_layer=2).eval()
    assert model.lm.store_weights_int8() > 0
    twin = copy.deepcopy(model)
    for parent in list(twin.lm.model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Int8WeightLinear):
                plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                plain.weight.data = child.weight
                if child.bias is not None:
                    plain.bias.data = child.bias
                setattr(parent, name, plain)
    twin.lm.head = twin.lm.model.get_output_embeddings()
    config = GenerationConfig(max_new_tokens=16, ret_scale_factor=1e4, min_word_tokens=3, max_rets=2)
    reference = _run(twin, special, config, use_cache=True)
    assert model.lm.enable_fast_decode(model.config.ret_layer, torch.int8)
    assert isinstance(model.lm.stepper.qkv[0], Int8Product)
    fast = _run(model, special, config, use_cache=True)
    assert [s.token_id for s in fast] == [s.token_id for s in reference]
    assert sum(s.ret_hidden is not None for s in fast) == 2
    for a, b in zip(fast, reference, strict=True):
        if b.ret_hidden is not None:
            torch.testing.assert_close(a.ret_hidden, b.ret_hidden, atol=5e-2, rtol=5e-2)


def test_other_architectures_keep_the_hugging_face_path(special):
    for lm in (tiny_opt(), tiny_gpt2()):
        model = build_model(lm, ret_layer=1).eval()
        assert not supports(model.lm.model)
        assert not model.lm.enable_fast_decode(1)
        assert len(_run(model, special, GenerationConfig(max_new_tokens=4, max_rets=0), use_cache=True)) == 4
