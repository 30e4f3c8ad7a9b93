"""Collections too big for the one-time tables: retrieval-pass prefixes computed in each step
(`prefix_cache_mb`) and refinement on a sample (`refine_max_examples`) — same training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fromage.training.loop import train

from .test_train import tiny_config, tiny_world  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FROMAGE_HOME", str(tmp_path / "home"))


def _steps(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "caption_loss" in r]


def test_prefixes_computed_in_each_step_train_the_same(tiny_world, tmp_path):  # noqa: F811
    table, lazy = tmp_path / "table", tmp_path / "lazy"
    train(tiny_config(tiny_world, table, max_steps=4, refine_steps=10))
    train(tiny_config(tiny_world, lazy, max_steps=4, refine_steps=10, prefix_cache_mb=0.0))
    for a, b in zip(_steps(table), _steps(lazy), strict=True):
        for key in ("loss", "ret_lm_loss", "contrastive_loss"):
            assert abs(a[key] - b[key]) < 1e-4, (a["step"], key, a[key], b[key])
    want = load_file(str(table / "checkpoint" / "model.safetensors"))
    got = load_file(str(lazy / "checkpoint" / "model.safetensors"))
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-4, rtol=1e-4)


def test_refinement_on_a_sample_of_the_examples(tiny_world, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    result = train(tiny_config(tiny_world, out, max_steps=2, refine_steps=10, refine_max_examples=5))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["refine/last_loss"] > 0 and result.step == 2
