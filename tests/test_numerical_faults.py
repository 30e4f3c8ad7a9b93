"""Numerical faults in training (issue #7 item 2): a NaN/inf loss or gradient is skipped and
counted; too many in a row stop the run with a clear message; checkpoints stay finite."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fromage.training import loop as train_module

from .test_train import tiny_config, tiny_world  # noqa: F401  (fixture)


def _poisoned(bad_calls: set[int]):
    """train_step that, on the listed calls, leaves NaN gradients and reports a NaN loss."""
    real = train_module.train_step
    calls = {"n": 0}

    def step(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            for p in model.trainable_parameters():
                if p.grad is not None:
                    p.grad.fill_(math.nan)
            out = {**out, "loss": math.nan}
        return out

    return step


def test_nonfinite_steps_are_skipped_counted_and_never_saved(tiny_world, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("FROMAGE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(train_module, "train_step", _poisoned({2, 3}))
    config = tiny_config(tiny_world, tmp_path / "run", max_steps=4, refine_steps=0)
    result = train_module.train(config)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["nonfinite_steps_skipped"] == 2
    assert result.step == 4  # four real updates; the two poisoned calls did not count
    tensors = load_file(str(result.checkpoint / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tiny_world, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("FROMAGE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(train_module, "train_step", _poisoned(set(range(2, 100))))
    config = tiny_config(tiny_world, tmp_path / "run", max_steps=50, refine_steps=0, max_nonfinite_steps=3)
    with pytest.raises(FloatingPointError, match="3 steps in a row had a non-finite loss or gradient"):
        train_module.train(config)
