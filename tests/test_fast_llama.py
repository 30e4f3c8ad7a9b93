import copy

import pytest
import torch

from fromage.backbones.fast_llama import BF16Product, supports
from fromage.backbones.int8_weights import Int8Product, Int8WeightLinear
from fromage.generate import GenerationConfig, decode

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


def _bf16_twin(model):
    """The Hugging Face float32 path on the weights rounded to bf16."""
    twin = copy.deepcopy(model)
    for module in twin.lm.model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.bfloat16().float()
    model.lm.store_weights_bf16()
    return twin


def _int8_twin(model):
    """The Hugging Face float32 path on the dequantised int8 weights (the head's included)."""
    model.lm.store_weights_int8()
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
    return twin


@pytest.mark.parametrize(
    ("storage", "twin_of", "product"),
    [(torch.bfloat16, _bf16_twin, BF16Product), (torch.int8, _int8_twin, Int8Product)],
    ids=["bf16", "int8"],
)
@pytest.mark.parametrize("tied", [False, True])
def test_fast_llama_step_on_stored_weights_matches_its_naive_twin_for_whole_answers(
    storage, twin_of, product, tied, special
):
    """The lean step on bf16- or int8-stored weights against its naive twin, the Hugging Face
    float32 path on the same rounded weights, token for token over whole answers, `[RET]`
    states included. (Before issue #18 only token 0 was compared, and it comes from the
    prefill, before the lean step runs.)"""
    model = build_model(tiny_llama(tied=tied, layers=3), ret_layer=2).eval()
    twin = twin_of(model)
    config = GenerationConfig(max_new_tokens=16, ret_scale_factor=1e4, min_word_tokens=3, max_rets=2)
    reference = _run(twin, special, config, use_cache=True)
    assert model.lm.enable_fast_decode(model.config.ret_layer, storage)
    assert isinstance(model.lm.stepper.qkv[0], product)
    fast = _run(model, special, config, use_cache=True)
    assert [s.token_id for s in fast] == [s.token_id for s in reference]
    assert sum(s.ret_hidden is not None for s in fast) == 2
    for a, b in zip(fast, reference, strict=True):
        if b.ret_hidden is not None:
            # bf16 activations in the lean step's products: close, not equal.
            torch.testing.assert_close(a.ret_hidden, b.ret_hidden, atol=5e-2, rtol=5e-2)


def test_other_architectures_keep_the_hugging_face_path(special):
    for lm in (tiny_opt(), tiny_gpt2()):
        model = build_model(lm, ret_layer=1).eval()
        assert not supports(model.lm.model)
        assert not model.lm.enable_fast_decode(1)
        assert len(_run(model, special, GenerationConfig(max_new_tokens=4, max_rets=0), use_cache=True)) == 4


def test_two_interleaved_decodes_on_one_model_do_not_share_a_cache(special):
    """Each `decode` holds its own key/value cache for the lean step: two answers streamed
    token by token in turn are the answers decoded one after the other."""
    model = build_model(tiny_llama(tied=True, layers=3), ret_layer=2).eval()
    assert model.lm.enable_fast_decode(model.config.ret_layer, torch.float32)
    config = GenerationConfig(max_new_tokens=10, max_rets=0)
    prompts = [torch.tensor([[1, 5, 6, 7, 8, 9]]), torch.tensor([[1, 9, 3]])]
    alone = [[s.token_id for s in decode(model, p, None, special, config)] for p in prompts]
    streams = [decode(model, p, None, special, config) for p in prompts]
    together: list[list[int]] = [[], []]
    for a, b in zip(*streams, strict=False):
        together[0].append(a.token_id)
        together[1].append(b.token_id)
    assert alone[0] != alone[1] and together == [alone[0][: len(together[0])], alone[1][: len(together[1])]]


def test_the_lean_step_runs_eagerly_where_torchscript_cannot_compile_it(monkeypatch):
    from fromage.backbones import fast_llama

    def refuse(fn):
        raise OSError("no source")

    fast_llama._scripted_layers.cache_clear()
    monkeypatch.setattr(torch.jit, "script", refuse)
    try:
        with pytest.warns(UserWarning, match="runs eagerly.*no source"):
            assert fast_llama._scripted_layers() is fast_llama._layers
    finally:
        fast_llama._scripted_layers.cache_clear()
