"""The embedded default backbones (SmolLM2-135M from its GGUF, EfficientNet-Lite0, the emoji
set), for real: slow, but still run by `make test` (`make setup` fetched the assets)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_embedded_backbones_load_offline():
    from fromage.backbones import load_encoder, load_lm
    from fromage.config import EncoderConfig, LMConfig
    from fromage.data.builtin import emoji_examples
    from fromage.data.images import load_image

    lm, tokenizer = load_lm(LMConfig())
    assert (lm.hidden_size, lm.num_layers, lm.vocab_size, lm.tied) == (576, 30, 49152, True)
    encoder = load_encoder(EncoderConfig())
    examples = emoji_examples("google", "train")[:4]
    feats = encoder.encode([load_image(e.image) for e in examples])
    assert feats.shape == (4, 1280) and torch.isfinite(feats).all()
    assert tokenizer.eos_token_id is not None
    # Both fast paths against their naive twin, across batch sizes (one export serves all).
    pixels = encoder.preprocess([load_image(e.image) for e in emoji_examples("google", "train")[:7]])
    with torch.no_grad():
        encoder.backend = "eager"
        eager = encoder(pixels)
        for backend in ("onnxruntime", "torchscript"):
            encoder.backend = backend
            fast_3, fast_7 = encoder(pixels[:3]), encoder(pixels)
            torch.testing.assert_close(fast_7, eager, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(fast_3, eager[:3], atol=1e-4, rtol=1e-4)
    assert len(encoder._sessions) == 1 and len(encoder._traced) == 1


def test_default_recipe_runs_a_few_steps_and_checkpoint_is_small(tmp_path: Path):
    from fromage.config import TrainConfig
    from fromage.data.builtin import emoji_examples
    from fromage.model import FromageModel
    from fromage.training.loop import train

    rows = ["caption\timage"] + [f"{e.caption}\t{e.image}" for e in emoji_examples("google", "train")[:24]]
    (tmp_path / "emoji.tsv").write_text("\n".join(rows) + "\n")
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=3, batch_size=4, retrieval_batch_size=8)
    config.data.sources = [str(tmp_path / "emoji.tsv")]
    result = train(config)
    assert result.trainable_parameters == sum(
        p.numel()
        for p in FromageModel.from_pretrained(result.checkpoint, load_encoder=False).trainable_parameters()
    )
    size = (result.checkpoint / "model.safetensors").stat().st_size
    assert size < 20 * 2**20, size
