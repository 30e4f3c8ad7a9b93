import pytest
import torch
from torch import nn

from fromage.backbones.bf16_weights import BF16WeightLinear
from fromage.generate import GenerationConfig, decode
from fromage.tokens import SpecialTokens

from .conftest import build_model, tiny_llama


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("max_rows", [8, 1 << 62])
def test_bf16_weight_linear_matches_float32_product_of_the_rounded_weight(rows, bias, max_rows):
    torch.manual_seed(0)
    linear = nn.Linear(48, 20, bias=bias)
    fast = BF16WeightLinear(linear, max_rows=max_rows)
    assert fast.weight.dtype == torch.bfloat16
    x = torch.randn(rows, 48)
    naive = x @ linear.weight.detach().bfloat16().float().T + (linear.bias.detach() if bias else 0)
    got = fast(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 20)
    # Above max_rows: float32 math on the rounded weight; up to it: bf16 inputs/outputs too.
    tolerance = 1e-5 if rows > max_rows else 2e-2
    assert torch.allclose(got, naive, atol=tolerance, rtol=tolerance)


def test_bf16_rows_follow_the_cpu(monkeypatch):
    """Every row goes through bf16 where the CPU has bf16 units, only decode-sized batches
    where it has not (there a bf16 product of many rows is slower than upcasting)."""
    from fromage.backbones import bf16_weights

    for native, expected in ((True, 1 << 62), (False, bf16_weights.FEW_ROWS)):
        monkeypatch.setattr(bf16_weights, "native_bf16", lambda native=native: native)
        assert bf16_weights.bf16_rows() == expected
        model = build_model(tiny_llama(tied=True)).eval()
        model.lm.store_weights_bf16()
        assert model.lm.head.max_rows == expected


def test_store_linear_weights_bf16_keeps_a_tiny_lm_close_to_float32():
    model = build_model(tiny_llama(tied=True)).eval()
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        reference = model(ids).logits
    replaced = model.lm.store_weights_bf16()
    assert replaced > 0 and isinstance(model.lm.head, BF16WeightLinear)
    assert model.lm.embeddings.weight.dtype == torch.float32  # a tied embedding keeps float32
    with torch.no_grad():
        got = model(ids).logits
    assert (got - reference).abs().max() < 0.05 * reference.abs().max()
    # Decoding still runs, cached and recomputed (their numerics differ only by rounding).
    special = SpecialTokens(bos=1, eos=-1, pad=0)
    config = GenerationConfig(max_new_tokens=5, max_rets=0)
    assert len(list(decode(model, ids, None, special, config))) == 5


def test_bf16_weights_need_a_float32_lm():
    model = build_model()
    model.lm.model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="needs a float32 LM"):
        model.lm.store_weights_bf16()
