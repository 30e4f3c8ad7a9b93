"""Data-parallel training (gloo, CPU) against one process at the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fromage.config import TaskMix
from fromage.training.distributed import launch
from fromage.training.loop import train

from .test_train import tiny_config, tiny_world  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FROMAGE_HOME", str(tmp_path / "home"))


def _steps(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "caption_loss" in r]


def _config(world: Path, out: Path, **overrides):
    # Feature dropout, interleaving and retrieval contexts on: their random draws must be
    # shared out exactly.
    config = tiny_config(
        world,
        out,
        max_steps=4,
        batch_size=4,
        retrieval_batch_size=6,
        refine_steps=0,
        interleave_prob=0.5,
        tasks=TaskMix(batch_size=4),
    )
    config.model.feature_dropout = 0.3
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoint" / "model.safetensors"))


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume_with_another_count(tiny_world, tmp_path):  # noqa: F811
    one = tmp_path / "one"
    train(_config(tiny_world, one))
    two = tmp_path / "two"
    launch(train, (_config(tiny_world, two, num_processes=2),), 2)

    single, double = _steps(one), _steps(two)
    assert [r["step"] for r in double] == [1, 2, 3, 4]
    for a, b in zip(single, double, strict=True):
        for key in ("loss", "caption_loss", "ret_lm_loss", "contrastive_loss"):
            assert abs(a[key] - b[key]) < 1e-4, (a["step"], key, a[key], b[key])
        # AdamW and clipping would hide a uniformly scaled gradient (a mean instead of a sum
        # over processes) in the tensors; the gradient norm before clipping shows it.
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1.0, a["grad_norm"]), (a, b)
    # One checkpoint, written by the main process, equal to the single-process one.
    assert sorted(p.name for p in (two / "checkpoint").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    for name, tensor in _tensors(one).items():
        torch.testing.assert_close(_tensors(two)[name], tensor, atol=1e-4, rtol=1e-4)

    # Two processes stop at step 2; one process resumes to step 4: same tensors as above.
    staged = tmp_path / "staged"
    launch(train, (_config(tiny_world, staged, num_processes=2, stop_at_step=2),), 2)
    train(_config(tiny_world, staged))
    assert [r["step"] for r in _steps(staged)] == [1, 2, 3, 4]
    for name, tensor in _tensors(one).items():
        torch.testing.assert_close(_tensors(staged)[name], tensor, atol=1e-4, rtol=1e-4)


def test_contrastive_gradients_sum_to_the_single_process_gradient(tmp_path):
    """The loss's gather keeps gradients for the local shard; summed over processes they are
    the one-process gradients, the temperature's included."""
    torch.manual_seed(0)
    text, image = torch.randn(6, 8), torch.randn(6, 8)
    groups = torch.tensor([0, 1, 1, 2, 3, 4])
    torch.save({"text": text, "image": image, "groups": groups}, tmp_path / "inputs.pt")
    launch(_shard_gradients, (str(tmp_path),), 2)

    from fromage.losses import contrastive_loss

    t, i = text.clone().requires_grad_(), image.clone().requires_grad_()
    scale = torch.tensor(2.0, requires_grad=True)
    loss, _ = contrastive_loss(
        torch.nn.functional.normalize(t, dim=-1), torch.nn.functional.normalize(i, dim=-1), scale, groups
    )
    loss.backward()
    parts = [torch.load(tmp_path / f"grads{r}.pt", weights_only=True) for r in range(2)]
    for part in parts:
        assert abs(part["loss"] - float(loss.detach())) < 1e-6
    assert t.grad is not None and i.grad is not None and scale.grad is not None
    torch.testing.assert_close(torch.cat([p["text"] for p in parts]), t.grad)
    torch.testing.assert_close(torch.cat([p["image"] for p in parts]), i.grad)
    torch.testing.assert_close(sum(p["scale"] for p in parts), scale.grad)


def _shard_gradients(directory: str) -> None:
    """Run in each of the processes: its shard's gradients of the gathered loss, saved."""
    from fromage.losses import contrastive_loss
    from fromage.training.distributed import init_processes

    procs = init_processes("cpu")
    inputs = torch.load(Path(directory) / "inputs.pt", weights_only=True)
    rows = procs.shard(list(range(6)))
    t = inputs["text"][rows].clone().requires_grad_()
    i = inputs["image"][rows].clone().requires_grad_()
    scale = torch.tensor(2.0, requires_grad=True)
    loss, _ = contrastive_loss(
        torch.nn.functional.normalize(t, dim=-1),
        torch.nn.functional.normalize(i, dim=-1),
        scale,
        inputs["groups"][rows],
    )
    loss.backward()
    torch.save(
        {"loss": float(loss), "text": t.grad, "image": i.grad, "scale": scale.grad},
        Path(directory) / f"grads{procs.rank}.pt",
    )
    procs.close()


@pytest.mark.slow
def test_sharded_frozen_lm_matches_one_process(tiny_world, tmp_path):  # noqa: F811
    """FSDP2-sharded decoder blocks (each process holds half the LM) give the same run, and
    the main process refines and validates on a whole copy afterwards."""
    one = tmp_path / "one"
    train(_config(tiny_world, one, refine_steps=5))
    two = tmp_path / "two"
    launch(train, (_config(tiny_world, two, refine_steps=5, num_processes=2, shard_lm=True),), 2)
    # The LM really was sharded (a no-op `--shard-lm` would pass the equalities below).
    summary = json.loads((two / "summary.json").read_text())
    assert summary["sharded_lm_blocks"] == len(_tiny_lm_layers(tiny_world))
    for a, b in zip(_steps(one), _steps(two), strict=True):
        for key in ("loss", "caption_loss", "ret_lm_loss", "contrastive_loss"):
            assert abs(a[key] - b[key]) < 1e-4, (a["step"], key, a[key], b[key])
    for name, tensor in _tensors(one).items():
        torch.testing.assert_close(_tensors(two)[name], tensor, atol=1e-4, rtol=1e-4)


def test_sharding_needs_mid_run_validation_off(tiny_world, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="shard_lm needs eval_every 0"):
        _config(tiny_world, tmp_path, shard_lm=True, eval_every=2).__post_init__()


def _tiny_lm_layers(world: Path) -> list[int]:
    config = json.loads((world / "llama" / "config.json").read_text())
    return list(range(config["num_hidden_layers"]))
