"""What the package asks pip for (issue #16): optional parts are extras, and a missing extra is
reported by name where it is needed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_optional_parts_are_extras():
    core = " ".join(_project()["dependencies"])
    for name in ("accelerate", "gguf", "gradio", "fastapi", "matplotlib"):
        assert name not in core, f"{name} is only needed by one path: it belongs in an extra"
    extras = _project()["optional-dependencies"]
    assert any(d.startswith("accelerate") for d in extras["distributed"])
    assert any(d.startswith("gguf") for d in extras["embedded"])
    makefile = (ROOT / "Makefile").read_text()
    for extra in ("embedded", "distributed"):
        assert extra in makefile.split(".[", 1)[1].split("]", 1)[0], f"make setup must install [{extra}]"


def test_data_parallel_training_without_accelerate_says_what_to_install(monkeypatch):
    from fromage.training.distributed import init_processes

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate now fails
    with pytest.raises(ImportError, match=r"pip install 'fromage\[distributed\]'"):
        init_processes("cpu")
