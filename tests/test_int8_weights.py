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
def test_int8_weight_linear_matches_the_float32_product_of_the_dequantised_weight(rows):
    torch.manual_seed(1)
    linear = nn.Linear(64, 24)
    fast = Int8WeightLinear(linear, max_rows=8)
    x = torch.randn(rows, 64)
    naive = x @ fast.weight.T + linear.bias.detach()
    got = fast(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 24)
    # Many rows: float32 math on the dequantised weight; few rows: bf16 inputs/outputs too.
    tolerance = 1e-5 if rows > 8 else 2e-2
    torch.testing.assert_close(got, naive, atol=tolerance, rtol=tolerance)
    # Dequantised, the weight is within one step of the original.
    assert (fast.weight - linear.weight.detach()).abs().max() <= fast.product.scale.float().max()


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
