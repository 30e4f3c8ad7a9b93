import pytest
import torch
from torch import nn

from fromage.backbones.int8_weights import Int8Product, Int8WeightLinear, quantize_rows

from .conftest import build_model, tiny_llama


def test_quantised_rows_stay_within_half_a_step_of_the_weight():
    torch.manual_seed(0)
    w = torch.randn(30, 40) * torch.linspace(0.01, 3.0, 30)[:, None]  # rows of very different ranges
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert bool(((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all())


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("wide_bf16", [False, True])
def test_int8_weight_linear_matches_the_float32_product_of_the_dequantised_weight(rows, wide_bf16):
    torch.manual_seed(1)
    linear = nn.Linear(64, 24)
    fast = Int8WeightLinear(linear, max_rows=8, wide_bf16=wide_bf16)
    x = torch.randn(rows, 64)
    naive = x @ fast.weight.T + linear.bias.detach()
    got = fast(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 24)
    # Many rows in float32: float32 math on the dequantised weight; few rows, or many rows
    # through bf16: bf16 inputs/outputs too (the int8 rows themselves are exact in bf16).
    tolerance = 1e-5 if rows > 8 and not wide_bf16 else 2e-2
    torch.testing.assert_close(got, naive, atol=tolerance, rtol=tolerance)
    # Dequantised, the weight is within one step of the original.
    assert (fast.weight - linear.weight.detach()).abs().max() <= fast.product.scale.float().max()


def test_int8_rows_are_exact_in_bf16():
    q = torch.arange(-127, 128, dtype=torch.int8)
    assert torch.equal(q.to(torch.bfloat16).float(), q.float())


def test_int8_storage_follows_the_cpu(monkeypatch):
    """With bf16 units, prompts above 16 rows go through bf16; without, 32 rows take the int8
    kernel and more the float32 product."""
    from fromage.backbones import bf16_weights

    for native, rows in ((True, 16), (False, 32)):
        monkeypatch.setattr(bf16_weights, "native_bf16", lambda native=native: native)
        model = build_model(tiny_llama(tied=True)).eval()
        model.lm.store_weights_int8()
        assert (model.lm.head.max_rows, model.lm.head.wide_bf16) == (rows, native)


def test_stacked_products_equal_their_parts():
    torch.manual_seed(2)
    parts = [Int8Product(torch.randn(n, 16)) for n in (8, 4, 4)]
    x = torch.randn(1, 16)
    torch.testing.assert_close(Int8Product.stacked(parts)(x), torch.cat([p(x) for p in parts], 1))


def test_store_weights_int8_keeps_a_tiny_lm_close_to_float32():
    model = build_model(tiny_llama(tied=True)).eval()
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        reference = model(ids).logits
    assert model.lm.store_weights_int8() > 0 and isinstance(model.lm.head, Int8WeightLinear)
    assert model.lm.embeddings.weight.dtype == torch.float32  # a tied embedding keeps float32
    with torch.no_grad():
        got = model(ids).logits
    assert (got - reference).abs().max() < 0.05 * reference.abs().max()
