"""Options for LMs too big for one process or one GPU's memory: decoder-block discovery for
sharding, and quantized loading (which needs CUDA + bitsandbytes, so here: its clear refusals)."""

from __future__ import annotations

import pytest
import torch

from fromage.backbones import load_lm, quantization_config
from fromage.backbones.lm import FrozenLM
from fromage.config import LMConfig

from .conftest import tiny_gpt2, tiny_llama, tiny_opt, tiny_qwen2


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt, tiny_gpt2, tiny_qwen2])
def test_decoder_layers_are_found_for_each_family(make):
    model = make()
    layers = FrozenLM(model).decoder_layers()
    assert len(layers) == model.config.num_hidden_layers == 2
    # The very modules the decoder runs (sharding hooks onto them).
    assert all(any(layer is m for m in model.modules()) for layer in layers)


def test_quantization_setting_is_checked():
    with pytest.raises(ValueError, match="lm.quantization must be one of none, 8bit, 4bit; got '3bit'"):
        LMConfig(quantization="3bit")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantized_loading_without_cuda_says_why(tmp_path, kind):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"lm.quantization={kind} needs a CUDA device"):
        load_lm(LMConfig(name=str(tmp_path), quantization=kind), device="cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        quantization_config(kind, torch.bfloat16, torch.device("cpu"))
