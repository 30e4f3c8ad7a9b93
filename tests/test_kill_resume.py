"""Crash-safe training (issue #7 item 1): real `fromage train` processes killed with SIGKILL at
random moments, many of them inside a checkpoint write, then resumed, end with exactly the
tensors of an uninterrupted run with the same seed (bit-identical on CPU)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fromage.config import save_json

from .test_train import tiny_config, tiny_world  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parent.parent


def _command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "fromage.cli", "train", "--config", str(config_path)]


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ, FROMAGE_HOME=str(home), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _run_to_end(config_path: Path, home: Path) -> None:
    done = subprocess.run(_command(config_path), env=_env(home), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_tensors(tiny_world, tmp_path):  # noqa: F811
    home = tmp_path / "home"
    configs = {}
    for name in ("reference", "killed"):
        # save_every=1: a checkpoint and a training state are written after every step, so a
        # good share of the random kills land inside a write.
        config = tiny_config(tiny_world, tmp_path / name, max_steps=60, refine_steps=0, save_every=1)
        configs[name] = tmp_path / f"{name}.json"
        save_json(config, configs[name])
    _run_to_end(configs["reference"], home)  # also warms the feature cache for both

    rng = random.Random(1234)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    kills = 0
    steps_seen = []
    for _ in range(6):
        logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        process = subprocess.Popen(
            _command(configs["killed"]),
            env=_env(home),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Start-up (imports, backbones) takes seconds; wait until this process has logged a
        # random number of steps, then kill it a random fraction of a step later.
        target = logged + rng.randint(1, 8)
        deadline = time.time() + 120
        while process.poll() is None and time.time() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= target:
                time.sleep(rng.uniform(0.0, 0.08))
                break
            time.sleep(0.005)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            kills += 1
        state = tmp_path / "killed" / "train_state" / "state.pt"
        if state.exists():
            steps_seen.append(int(torch.load(state, weights_only=True)["step"]))
    _run_to_end(configs["killed"], home)

    assert kills >= 3, "the run finished before most kills: make it longer"
    # Each restart went on from its saved state: a step is logged again only when a kill fell
    # between logging it and saving it (at most one step back), never from the start.
    logged = [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "caption_loss" in r]
    drops = [a - b for a, b in zip(logged, logged[1:], strict=False) if b <= a]
    assert all(d <= 1 for d in drops), f"a restart went back further than one step: {logged}"
    assert len(set(steps_seen)) >= 2, f"kills did not land at different steps: {steps_seen}"
    reference = load_file(str(tmp_path / "reference" / "checkpoint" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "checkpoint" / "model.safetensors"))
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed[name]), name
    # A kill inside a write leaves at most a hidden temporary file; the next run removes it.
    assert [p.name for p in (tmp_path / "killed").rglob(".*") if p.is_file()] == []


def test_a_crash_inside_a_checkpoint_write_keeps_the_previous_one_whole(tiny_world, tmp_path, monkeypatch):  # noqa: F811
    """The deterministic twin of the kill campaign: the third checkpoint write dies halfway
    (half a file on disk, then a BaseException, as a signal would)."""
    import safetensors.torch

    from fromage.training.loop import train

    monkeypatch.setenv("FROMAGE_HOME", str(tmp_path / "home"))
    train(tiny_config(tiny_world, tmp_path / "reference", max_steps=8, save_every=2, refine_steps=0))
    real = safetensors.torch.save_file
    writes = {"n": 0}

    def torn(tensors, path, metadata=None):
        writes["n"] += 1
        real(tensors, path, metadata=metadata)
        if writes["n"] == 3:
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            raise SystemExit("killed while writing the checkpoint")

    monkeypatch.setattr(safetensors.torch, "save_file", torn)  # checkpoint.py imports it per call
    config = tiny_config(tiny_world, tmp_path / "killed", max_steps=8, save_every=2, refine_steps=0)
    with pytest.raises(SystemExit):
        train(config)
    ckpt = tmp_path / "killed" / "checkpoint"
    assert load_file(str(ckpt / "model.safetensors"))  # the step-4 checkpoint, whole
    assert not [p.name for p in ckpt.iterdir() if p.name.startswith(".")]  # no half file left
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    train(config)  # resumes from the last training state
    reference = load_file(str(tmp_path / "reference" / "checkpoint" / "model.safetensors"))
    resumed = load_file(str(ckpt / "model.safetensors"))
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed[name]), name
