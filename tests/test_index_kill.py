"""Crash-safe indexing (issue #7 items 1 and 4): `fromage index` processes killed with SIGKILL
at random moments while they grow an index never cost the rows it already held; and a writer
killed between its two renames (the one moment no index is in place) is repaired."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fromage.apps.indexing import index_collection
from fromage.index.store import BadIndex, ImageIndex, recover

from .test_indexing import _train
from .test_train import tiny_world  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FROMAGE_HOME", str(tmp_path / "home"))


def _folder(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{seed}-{i:03d}.png")
    return root


def _rows(directory: Path) -> dict[str, np.ndarray]:
    index = ImageIndex.load(directory)
    return {Path(m["path"]).name: np.asarray(index.embeddings[i]) for i, m in enumerate(index.metadata)}


@pytest.mark.slow
def test_sigkill_while_growing_an_index_never_loses_rows(tiny_world, tmp_path):  # noqa: F811
    _, checkpoint = _train(tiny_world, tmp_path / "run")
    first = _folder(tmp_path / "first", 30, seed=1)
    both = tmp_path / "both"
    shutil.copytree(first, both)
    for path in _folder(tmp_path / "second", 30, seed=2).iterdir():
        shutil.copy(path, both / path.name)
    reference = tmp_path / "reference"
    index_collection(str(first), checkpoint, reference)
    index_collection(str(both), checkpoint, reference)
    want = _rows(reference)

    out = tmp_path / "idx"
    index_collection(str(first), checkpoint, out)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("PYTEST_CURRENT_TEST", None)
    command = [sys.executable, "-m", "fromage.cli", "index", str(both), "--model", str(checkpoint)]
    command += ["--out", str(out)]
    # How long an uninterrupted run takes here (start-up dominates), to aim the kills.
    timing = tmp_path / "timing"
    shutil.copytree(out, timing)
    timing_start = tmp_path / "first-only"  # the 30-row index every kill starts from again
    shutil.copytree(out, timing_start)
    start = time.monotonic()
    subprocess.run(command[:-1] + [str(timing)], env=env, check=True, capture_output=True)
    full = time.monotonic() - start

    rng = random.Random(7)
    held = []
    in_work = 0  # kills that landed while the run was embedding or writing, not in start-up
    for _ in range(5):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Start-up (interpreter, torch, the model) is most of a run: wait until its scratch or
        # temporary directory appears, then kill it a random moment later.
        deadline = time.monotonic() + 3 * full
        working = False
        while process.poll() is None and time.monotonic() < deadline:
            if any(tmp_path.glob(".idx.*")):
                working = True
                time.sleep(rng.uniform(0.0, 0.05))
                break
            time.sleep(0.002)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            in_work += working
        process.wait()
        rows = _rows(out)  # loads (repairing a half-finished save) or raises: never torn
        held.append(len(rows))
        assert set(rows) in ({p.name for p in first.iterdir()}, set(want))
        for name, vector in rows.items():
            np.testing.assert_allclose(vector, want[name], atol=1e-6)
        if len(rows) == len(want):  # the kill came after the save: grow it again next time
            shutil.rmtree(out)
            shutil.copytree(timing_start, out)
    subprocess.run(command, env=env, check=True, capture_output=True)
    assert _rows(out).keys() == want.keys()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".idx.")]
    assert leftovers == [], leftovers
    assert set(held) <= {30, 60}
    assert in_work >= 2, f"only {in_work} of 5 kills landed after start-up: the campaign tested little"


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(done.stdout)


@pytest.mark.parametrize("new_complete", [True, False])
def test_a_writer_killed_between_its_renames_is_repaired(tmp_path, new_complete):
    rng = np.random.default_rng(0)
    old_rows = rng.standard_normal((20, 8)).astype(np.float32)
    old = ImageIndex.build(old_rows, [{"path": f"{i}.png"} for i in range(20)], "enc", "ckpt", "flat")
    new_rows = np.concatenate([old_rows, rng.standard_normal((5, 8)).astype(np.float32)])
    new = ImageIndex.build(new_rows, [{"path": f"{i}.png"} for i in range(25)], "enc", "ckpt", "flat")
    directory = tmp_path / "idx"
    # The state `save` leaves when killed after its first rename: no index at `directory`.
    pid = _dead_pid()
    old.save(tmp_path / f".idx.old-{pid}")
    new.save(tmp_path / f".idx.tmp-{pid}")
    if not new_complete:  # killed while writing the new version: its files do not check out
        with open(tmp_path / f".idx.tmp-{pid}" / "embeddings.npy", "r+b") as f:
            f.truncate(100)
    loaded = ImageIndex.load(directory)
    assert len(loaded) == (25 if new_complete else 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_a_live_writers_temporaries_are_left_alone_and_a_missing_index_says_so(tmp_path):
    with pytest.raises(BadIndex, match="no image index there"):
        ImageIndex.load(tmp_path / "nothing")
    live = tmp_path / f".idx.tmp-{os.getppid()}"  # the parent of this process: alive
    live.mkdir()
    assert not recover(tmp_path / "idx")
    assert live.exists()
