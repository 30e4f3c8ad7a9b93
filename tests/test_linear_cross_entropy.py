"""The chunked captioning loss against its naive twin: full (N, V + 1) logits, then CE."""

from __future__ import annotations

import pytest
import torch

from fromage.losses import caption_loss, linear_cross_entropy


def _naive(hidden, weight, bias, extra, targets, count=None):
    frozen = hidden @ weight.T + (0 if bias is None else bias)
    logits = torch.cat([frozen, (hidden @ extra)[:, None]], 1)
    return caption_loss(logits, targets, count)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk", [7, 20, 256])
def test_value_and_gradients_equal_the_full_logits(with_bias, chunk):
    torch.manual_seed(0)
    n, d, vocab = 20, 16, 50
    weight = torch.randn(vocab, d)
    bias = torch.randn(vocab) if with_bias else None
    targets = torch.randint(0, vocab + 1, (n,))
    targets[:3] = vocab  # [RET] is a target too
    hidden = torch.randn(n, d, requires_grad=True)
    extra = torch.randn(d, requires_grad=True)
    want = _naive(hidden, weight, bias, extra, targets, count=33.0)
    want_grads = torch.autograd.grad(want * 2.5, [hidden, extra])
    got = linear_cross_entropy(hidden, weight, extra, targets, bias, count=33.0, chunk=chunk)
    got_grads = torch.autograd.grad(got * 2.5, [hidden, extra])
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


def test_without_gradients_it_only_computes_the_value():
    torch.manual_seed(1)
    hidden, weight, extra = torch.randn(9, 8), torch.randn(30, 8), torch.randn(8)
    targets = torch.randint(0, 31, (9,))
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, extra, targets, chunk=4)
    torch.testing.assert_close(got, _naive(hidden, weight, None, extra, targets))


def test_a_trainable_head_is_refused():
    weight = torch.randn(30, 8, requires_grad=True)
    with pytest.raises(ValueError, match="must be frozen"):
        linear_cross_entropy(torch.randn(4, 8), weight, torch.randn(8), torch.zeros(4, dtype=torch.long))
