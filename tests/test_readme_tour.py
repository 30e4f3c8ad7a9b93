"""README's first tour, run as written from outside the checkout (slow: the shipped model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _tour() -> list[str]:
    """The commands of README's first tour (the block after "A first tour")."""
    text = (REPO / "README.md").read_text()
    block = text.split("A first tour", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_the_first_tour_runs_from_any_directory(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), (220, 30, 30)).save(tmp_path / "photo.jpg")
    fromage = str(Path(sys.executable).with_name("fromage"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    commands = _tour()
    assert [c.split("|")[-1].split()[1] for c in commands] == ["caption", "retrieve", "chat"]
    outputs = []
    for command in commands:
        done = subprocess.run(
            command.replace("fromage ", f"{fromage} "),
            shell=True,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, (command, done.stderr[-2000:])
        outputs.append(done.stdout)
    assert outputs[0].startswith("photo.jpg\t")
    found = json.loads(outputs[1])
    assert found["query"] == "red apple" and len(found["images"]) == 3
    assert "fromage>" in outputs[2]
