"""Activation checkpointing of the frozen LM (ModelConfig.activation_checkpointing) against its
naive twin, the same model without it: same losses and gradients, fewer saved activations."""

from __future__ import annotations

import pytest
import torch

from fromage.backbones.lm import FrozenLM
from fromage.config import ModelConfig
from fromage.data.collate import caption_batch, retrieval_prefix_batch
from fromage.losses import caption_loss, contrastive_loss, ret_token_loss
from fromage.model import FromageModel

from .conftest import build_model, tiny_gpt2, tiny_llama, tiny_opt


def _step(model: FromageModel, special, count_saved: bool = False) -> tuple[torch.Tensor, dict, int]:
    """One captioning + retrieval pass as train_step runs them; returns the loss, the trainable
    parameters' gradients and how many numbers autograd saved for the backward pass."""
    torch.manual_seed(5)
    feats = torch.randn(4, 24)
    texts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        batch = caption_batch(texts, model.config.num_visual_tokens, special, interleave=True)
        logits, targets = model.caption_forward(
            batch.input_ids, batch.attention_mask, feats[batch.image_order], batch.labels
        )
        ids, mask = retrieval_prefix_batch(texts, special)
        ret = model.retrieval_forward(ids, mask)
        loss = (
            caption_loss(logits, targets)
            + ret_token_loss(ret.frozen_lse, ret.frozen_target_logit, ret.ret_logit, ret.target_is_ret)
            + contrastive_loss(
                model.text_embeddings(ret.ret_hidden), model.image_embeddings(feats), model.logit_scale
            )[0]
        )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads, saved


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt, tiny_gpt2])
def test_checkpointing_gives_the_same_loss_and_gradients(make, special):
    plain = build_model(make())
    loss, grads, saved = _step(plain, special)
    plain.lm.set_activation_checkpointing(True)
    loss_ckpt, grads_ckpt, saved_ckpt = _step(plain, special)
    assert torch.allclose(loss, loss_ckpt, atol=1e-6), (float(loss), float(loss_ckpt))
    assert grads.keys() == grads_ckpt.keys() and "visual_map.weight" in grads
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], atol=1e-6, rtol=1e-5), name
    # Checkpointed blocks keep only their inputs: far less is held for the backward pass.
    assert saved_ckpt < saved * 0.6, (saved_ckpt, saved)
    # Half the blocks: the same gradients, memory in between.
    plain.lm.set_activation_checkpointing(True, 0.5)
    loss_half, grads_half, saved_half = _step(plain, special)
    assert torch.allclose(loss, loss_half, atol=1e-6)
    for name in grads:
        assert torch.allclose(grads[name], grads_half[name], atol=1e-6, rtol=1e-5), name
    assert saved_ckpt < saved_half < saved, (saved_ckpt, saved_half, saved)
    plain.lm.set_activation_checkpointing(False)
    assert _step(plain, special)[2] == saved


def test_config_switch_turns_it_on():
    from fromage.backbones.lm import FrozenLM

    config = ModelConfig(num_visual_tokens=2, retrieval_dim=16, activation_checkpointing=True)
    model = FromageModel(config, FrozenLM(tiny_llama()), feature_dim=24)
    assert model.lm.checkpointing
    assert not build_model().lm.checkpointing


def test_cached_decoding_is_unaffected(special):
    """Blocks that extend a KV cache are never recomputed (a recompute would append twice)."""
    model = build_model()
    ids, mask = retrieval_prefix_batch([[5, 6, 7], [8, 9]], special)
    before = model.retrieval_forward(ids, mask)
    model.lm.set_activation_checkpointing(True)
    after = model.retrieval_forward(ids, mask)
    assert torch.allclose(before.ret_hidden, after.ret_hidden, atol=1e-6)
    out = model(ids, mask, use_cache=True, compute_logits=False)
    assert out.cache.get_seq_length() == ids.shape[1]


def test_a_share_of_the_blocks_checkpoints_only_the_first_ones():
    lm = FrozenLM(tiny_llama(layers=4))
    assert lm.set_activation_checkpointing(True, 0.5) == 2
    assert lm.set_activation_checkpointing(True, 1.0) == 4
    assert lm.set_activation_checkpointing(False, 1.0) == 0
    with pytest.raises(ValueError, match="share must be in"):
        lm.set_activation_checkpointing(True, 1.5)
