"""`GrowingLayer` (backbones/growing_cache.py): appending in place gives what concatenation gives."""

import torch
from transformers.cache_utils import DynamicLayer

from fromage.backbones.growing_cache import SPARE, GrowingLayer, growing


def _kv(batch: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 3, n, 8), torch.randn(batch, 3, n, 8)


def test_appending_in_place_equals_concatenation_and_reuses_the_buffer():
    torch.manual_seed(0)
    plain, grown = DynamicLayer(), GrowingLayer()
    prompt = _kv(2, 5)
    plain.update(*prompt)
    grown.update(*prompt)
    buffer = grown.keys.data_ptr()
    for _ in range(SPARE + 3):  # past the spare room: one reallocation on the way
        step = _kv(2, 1)
        want = plain.update(*step)
        got = grown.update(*step)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert grown.get_seq_length() == plain.get_seq_length() == 5 + SPARE + 3
    assert grown.keys.data_ptr() != buffer  # it grew once...
    kept = grown.keys.data_ptr()
    grown.update(*_kv(2, 1))
    assert grown.keys.data_ptr() == kept  # ...and appends in place again


def test_a_replaced_cache_is_taken_over_as_it_is():
    """BatchDecoder replaces keys/values when rows join or leave; the next step starts from them."""
    torch.manual_seed(1)
    layer = GrowingLayer()
    layer.update(*_kv(3, 4))
    kept_keys, kept_values = layer.keys[[0, 2]].clone(), layer.values[[0, 2]].clone()
    layer.keys, layer.values = layer.keys[[0, 2]], layer.values[[0, 2]]  # a row left
    step = _kv(2, 1)
    keys, values = layer.update(*step)
    assert torch.equal(keys, torch.cat([kept_keys, step[0]], 2))
    assert torch.equal(values, torch.cat([kept_values, step[1]], 2))


def test_growing_swaps_only_plain_dynamic_layers():
    class Cache:
        layers = [DynamicLayer(), object()]

    first = Cache.layers[0]
    first.update(*_kv(1, 2))
    cache = growing(Cache())
    assert isinstance(cache.layers[0], GrowingLayer) and torch.equal(cache.layers[0].keys, first.keys)
    assert not isinstance(cache.layers[1], GrowingLayer)
