"""Training end to end on tiny random backbones loaded *by path* through the real loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fromage.config import DataConfig, EncoderConfig, LMConfig, ModelConfig, TrainConfig

from .conftest import TRAINABLE, tiny_clip_vision, tiny_llama, tiny_opt

WORDS = ["red", "green", "blue", "circle", "square", "a", "big", "small", "dot", "."]
COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def _save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    for name, make in (("llama", lambda: tiny_llama(tied=False)), ("opt", tiny_opt)):
        make().save_pretrained(root / name)
        _save_tokenizer(root / name)
    tiny_clip_vision().save_pretrained(root / "clip")
    images = root / "images"
    images.mkdir()
    rows = ["caption\timage"]
    for color in COLORS:
        for shape in ("circle", "square"):
            img = Image.new("RGB", (16, 16), (255, 255, 255))
            box = (3, 3, 13, 13)
            from PIL import ImageDraw

            draw = ImageDraw.Draw(img)
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
            img.save(images / f"{color}_{shape}.png")
            rows.append(f"a {color} {shape}\t{color}_{shape}.png")
    (images / "data.tsv").write_text("\n".join(rows) + "\n")
    return root


def tiny_config(world: Path, out: Path, lm: str = "llama", **overrides) -> TrainConfig:
    config = TrainConfig(
        model=ModelConfig(
            lm=LMConfig(name=str(world / lm)),
            encoder=EncoderConfig(name=str(world / "clip"), image_size=16),
            num_visual_tokens=2,
            retrieval_dim=16,
        ),
        data=DataConfig(sources=[str(world / "images" / "data.tsv")], max_bad_fraction=0.0, augment_views=1),
        output_dir=str(out),
        max_steps=6,
        max_minutes=0.0,  # a wall-time budget would make the schedule depend on the clock
        batch_size=4,
        retrieval_batch_size=6,
        refine_steps=20,
        refine_batch_size=6,
        lr=3e-3,
        warmup_steps=1,
        eval_every=1000,
        save_every=1000,
        log_every=1,
        device="cpu",
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "caption_loss" in r]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in _rows(out)]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FROMAGE_HOME", str(tmp_path / "home"))


@pytest.mark.parametrize("lm", ["llama", "opt"])
def test_tiny_models_train_and_lower_their_loss(tiny_world, tmp_path, lm):
    from fromage.training.loop import train

    config = tiny_config(tiny_world, tmp_path / "run", lm=lm, max_steps=60, lr=1e-2)
    train(config)
    rows = _rows(tmp_path / "run")
    assert len(rows) == 60

    def mean(key: str, part: slice) -> float:
        values = [r[key] for r in rows[part]]
        return sum(values) / len(values)

    # [RET] + maps (contrastive) and the total improve clearly. Captioning through a tiny random
    # LM barely moves in a joint run (its next-token distribution is nearly uniform whatever the
    # input): here it must not get worse; `test_caption_pathway_learns` tests it on its own.
    assert mean("loss", slice(-10, None)) < mean("loss", slice(0, 10)) * 0.95
    assert mean("contrastive_loss", slice(-10, None)) < mean("contrastive_loss", slice(0, 10)) * 0.5
    assert mean("caption_loss", slice(-10, None)) < mean("caption_loss", slice(0, 10)) * 1.002


@pytest.mark.parametrize("lm", ["llama", "opt"])
def test_caption_pathway_learns(lm):
    """The visual map alone, through the frozen LM, lowers the caption loss of a fixed batch.
    A tiny random LM's logits span little (its head is initialised at std 0.02), so the
    reachable drop is ~0.15 nats from log(96); without gradient flow it would be 0."""
    from fromage.data.collate import caption_batch
    from fromage.losses import caption_loss
    from fromage.tokens import SpecialTokens

    from .conftest import build_model, tiny_llama, tiny_opt

    model = build_model(tiny_llama(tied=False) if lm == "llama" else tiny_opt(), k=2)
    model.train()
    torch.manual_seed(0)
    captions = [[5 + i, 20 + i, 40 + i] for i in range(8)]
    batch = caption_batch(captions, 2, SpecialTokens(1, 2, 0))
    feats = torch.randn(8, model.config.feature_dim)
    optimizer = torch.optim.Adam(model.visual_map.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        logits, targets = model.caption_forward(batch.input_ids, batch.attention_mask, feats, batch.labels)
        loss = caption_loss(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.08, losses[::8]


def test_only_trainables_get_optimizer_state(tiny_world, tmp_path):
    from fromage.training.loop import train

    train(tiny_config(tiny_world, tmp_path / "run"))
    state = torch.load(tmp_path / "run" / "train_state" / "state.pt", weights_only=True)
    # AdamW state exists for exactly the trainable tensors: 3 maps x (weight, bias), [RET] in
    # and out (untied Llama head), and the temperature; the largest is the visual map.
    assert len(state["optimizer"]["state"]) == 3 * 2 + 2 + 1
    sizes = sorted(int(s["exp_avg"].numel()) for s in state["optimizer"]["state"].values())
    assert max(sizes) == 32 * 2 * 32  # visual map weight: F=32 → k*d = 2*32


def test_frozen_lm_bit_identical_after_training(tiny_world, tmp_path):
    """The in-memory frozen LM is bit-identical after steps (not only its file on disk)."""
    from fromage.training.loop import train

    config = tiny_config(tiny_world, tmp_path / "run", max_steps=3)
    from fromage.training import loop as train_module

    captured = {}
    original = train_module.FromageModel

    class Spy(original):  # type: ignore[misc,valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            captured["model"] = self
            captured["frozen"] = {k: v.clone() for k, v in self.lm.state_dict().items()}

    train_module.FromageModel = Spy
    try:
        train(config)
    finally:
        train_module.FromageModel = original
    model = captured["model"]
    for name, tensor in model.lm.state_dict().items():
        assert torch.equal(tensor, captured["frozen"][name]), name
    assert all(p.grad is None for p in model.lm.parameters())


def test_checkpoint_round_trip_holds_only_trained_tensors(tiny_world, tmp_path):
    from safetensors import safe_open

    from fromage.model import FromageModel
    from fromage.training.loop import train

    config = tiny_config(tiny_world, tmp_path / "run")
    result = train(config)
    with safe_open(str(result.checkpoint / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert not any(n.startswith(("lm.", "encoder.")) for n in names)
    # Trained tensors only: the parameters (untied Llama head: plus `ret_output`) and the
    # feature / [RET]-state statistics.
    assert names == TRAINABLE | {"ret_output", "feature_mean", "feature_std", "text_mean", "text_std"}
    loaded = FromageModel.from_pretrained(result.checkpoint)
    loaded.save_pretrained(tmp_path / "again")
    reloaded = FromageModel.from_pretrained(tmp_path / "again")
    for name, tensor in loaded.trained_state_dict().items():
        assert torch.equal(tensor, reloaded.trained_state_dict()[name]), name
    # The resumable state is the joint loop's; refinement changed only the retrieval head.
    state = torch.load(tmp_path / "run" / "train_state" / "state.pt", weights_only=True)["model"]
    head = {"text_ret_map.weight", "text_ret_map.bias", "image_ret_map.weight", "image_ret_map.bias"}
    for name, tensor in loaded.trained_state_dict().items():
        assert torch.equal(tensor, state[name]) == (name not in head | {"logit_scale"}), name


def test_same_seed_same_first_steps(tiny_world, tmp_path):
    from fromage.training.loop import train

    train(tiny_config(tiny_world, tmp_path / "a", max_steps=4))
    train(tiny_config(tiny_world, tmp_path / "b", max_steps=4))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_resume_continues_where_it_stopped(tiny_world, tmp_path):
    from safetensors.torch import load_file

    from fromage.training.loop import train

    train(tiny_config(tiny_world, tmp_path / "full", max_steps=6))
    train(tiny_config(tiny_world, tmp_path / "split", stop_at_step=3))
    assert _rows(tmp_path / "split")[-1]["step"] == 3
    train(tiny_config(tiny_world, tmp_path / "split"))
    # The second run went on from step 3: a resume that silently restarted from 0 would log
    # 1, 2, 3 again (and, training being deterministic, end at the same tensors).
    assert [r["step"] for r in _rows(tmp_path / "split")] == [1, 2, 3, 4, 5, 6]
    full = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "checkpoint" / "model.safetensors"))
    for name in full:
        torch.testing.assert_close(full[name], split[name], atol=1e-6, rtol=1e-5)


def test_a_run_can_start_from_another_runs_checkpoint(tiny_world, tmp_path):
    from safetensors.torch import load_file

    from fromage.training.loop import train

    train(tiny_config(tiny_world, tmp_path / "first", refine_steps=0))
    first = load_file(str(tmp_path / "first" / "checkpoint" / "model.safetensors"))
    # With a learning rate too small to move anything, a continued run ends where the first
    # did (statistics included); the same run from scratch ends elsewhere.
    still = dict(refine_steps=0, max_steps=2, lr=1e-12, seed=1)
    init = str(tmp_path / "first" / "checkpoint")
    train(tiny_config(tiny_world, tmp_path / "second", init_from=init, **still))
    train(tiny_config(tiny_world, tmp_path / "scratch", **still))
    second = load_file(str(tmp_path / "second" / "checkpoint" / "model.safetensors"))
    scratch = load_file(str(tmp_path / "scratch" / "checkpoint" / "model.safetensors"))
    assert set(second) == set(first)
    for name in first:
        torch.testing.assert_close(second[name], first[name], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(scratch["visual_map.weight"], first["visual_map.weight"])
    assert not torch.allclose(scratch["ret_embedding"], first["ret_embedding"])


def test_starting_from_a_checkpoint_of_another_model_is_refused(tiny_world, tmp_path):
    import shutil

    from fromage.training.loop import train

    train(tiny_config(tiny_world, tmp_path / "first", refine_steps=0, max_steps=1))
    init = str(tmp_path / "first" / "checkpoint")
    with pytest.raises(ValueError, match=r"model config differs .*lm\.name"):
        train(tiny_config(tiny_world, tmp_path / "other", lm="opt", init_from=init, max_steps=1))
    # Training-only settings may change between stages; a stage that resumes its own state
    # no longer needs the checkpoint it started from.
    second = tiny_config(tiny_world, tmp_path / "second", init_from=init, max_steps=3, stop_at_step=1)
    second.model.feature_dropout = 0.5
    train(second)
    shutil.rmtree(tmp_path / "first")
    second.stop_at_step = 0
    train(second)
    assert [r["step"] for r in _rows(tmp_path / "second")] == [1, 2, 3]


def test_bad_images_are_counted_and_limit_enforced(tiny_world, tmp_path):
    from fromage.data.readers import TooManyBadInputs
    from fromage.training.loop import train

    data = tmp_path / "data"
    data.mkdir()
    rows = (tiny_world / "images" / "data.tsv").read_text().splitlines()
    src = tiny_world / "images"
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = [rows[0]] + [f"{r.split(chr(9))[0]}\t{src / r.split(chr(9))[1]}" for r in rows[1:]]
    lines += ["a red dot\tbroken.png", "only one field", "a blue dot\tmissing.png"]
    (data / "data.tsv").write_text("\n".join(lines) + "\n")
    config = tiny_config(tiny_world, tmp_path / "run")
    config.data.sources = [str(data / "data.tsv")]
    with pytest.raises(TooManyBadInputs, match=r"3 of \d+ inputs are bad"):
        train(config)
    config.data.max_bad_fraction = 0.5
    train(config)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["bad_input_kinds"] == {"malformed row": 1, "undecodable image": 1, "unreadable image": 1}


def test_cli_train_in_process(tiny_world, tmp_path, capsys):
    from fromage.cli import main
    from fromage.config import save_json

    save_json(tiny_config(tiny_world, tmp_path / "run"), tmp_path / "config.json")
    code = main(
        ["train", "--config", str(tmp_path / "config.json"), "--max-steps", "2", "--model.retrieval-dim=8"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "trainable parameters:" in out and "peak resident memory:" in out
    saved = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())
    assert saved["retrieval_dim"] == 8
