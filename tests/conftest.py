"""Tiny random backbones built from configs: no network, no downloads, seconds on a CPU."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 96

# The trainable parameters of a model with a tied head (an untied head adds `ret_output`).
TRAINABLE = {
    "visual_map.weight",
    "visual_map.bias",
    "text_ret_map.weight",
    "text_ret_map.bias",
    "image_ret_map.weight",
    "image_ret_map.bias",
    "logit_scale",
    "ret_embedding",
}


def tiny_llama(tied: bool = False, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
        dropout=0.1,
    )
    return OPTForCausalLM(config)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config)


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=128,
    )
    return Qwen2ForCausalLM(config)


def tiny_clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
        projection_dim=16,
    )
    return CLIPVisionModel(config)


def build_model(lm_model=None, feature_dim: int = 24, k: int = 2, ret_layer: int = -1, dropout: float = 0.0):
    from fromage.backbones.lm import FrozenLM
    from fromage.config import ModelConfig
    from fromage.model import FromageModel

    lm = FrozenLM(lm_model if lm_model is not None else tiny_llama())
    config = ModelConfig(num_visual_tokens=k, retrieval_dim=16, ret_layer=ret_layer, feature_dropout=dropout)
    torch.manual_seed(1)
    return FromageModel(config, lm, feature_dim=feature_dim)


@pytest.fixture
def special():
    from fromage.tokens import SpecialTokens

    return SpecialTokens(bos=1, eos=2, pad=0)
