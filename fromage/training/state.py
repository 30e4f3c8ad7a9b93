"""What a run needs to resume exactly: the step, the optimiser, the data samplers' positions,
every random generator, and the trained tensors (also in the checkpoint).

`output_dir/checkpoint/` holds the model (checkpoint.py); `output_dir/train_state/state.pt`
the rest. Both are written atomically, so a run killed at any moment resumes from the last
complete pair; re-running the same command continues from there with the same tensors an
uninterrupted run would have (tested).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import save_model
from ..config import TrainConfig, to_dict
from ..fileio import atomic_write
from ..model import FromageModel

log = logging.getLogger(__name__)


class EpochSampler:
    """Shuffled passes over N items; its position is part of the resumable state."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            take = min(count - len(out), self.n - self.pos)
            out += self._order[self.pos : self.pos + take]
            self.pos += take
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._shuffle()


def has_state(out_dir: Path) -> bool:
    """Whether `out_dir` holds a saved loop state (a run there resumes)."""
    return (out_dir / "train_state" / "state.pt").exists()


@dataclass
class RunState:
    """The loop's mutable state besides the model. The same for any number of processes
    (samplers and random draws are global)."""

    optimizer: torch.optim.Optimizer
    caption_sampler: EpochSampler
    retrieval_sampler: EpochSampler
    generator: torch.Generator
    step: int = 0

    def save(self, out_dir: Path, model: FromageModel, config: TrainConfig) -> None:
        save_model(model, out_dir / "checkpoint", extra={"step": self.step, "train_config": to_dict(config)})
        state: dict[str, Any] = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "generator": self.generator.get_state(),
            "python_rng": list(random.getstate()[1]),
            "numpy_rng": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "samplers": [self.caption_sampler.state(), self.retrieval_sampler.state()],
            # The model's trained tensors are in the checkpoint; kept here too so the state is whole.
            "model": model.trained_state_dict(),
        }
        atomic_write(out_dir / "train_state" / "state.pt", lambda tmp: torch.save(state, tmp))

    def load(self, out_dir: Path, model: FromageModel) -> bool:
        """Restore the saved state if there is one; → whether there was."""
        if not has_state(out_dir):
            return False
        path = out_dir / "train_state" / "state.pt"
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_trained_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator"])
        random.setstate((3, tuple(state["python_rng"]), None))
        np_state = np.random.get_state()
        np.random.set_state((np_state[0], state["numpy_rng"].numpy().astype(np.uint32), 624, 0, 0.0))
        self.caption_sampler.load(state["samplers"][0])
        self.retrieval_sampler.load(state["samplers"][1])
        self.step = int(state["step"])
        return True


def remove_stale_temporaries(out_dir: Path) -> None:
    """Half-written files a killed run left behind (writes go to a hidden temporary name and
    are renamed when complete, so these never hold anything the run needs)."""
    for folder in (out_dir / "checkpoint", out_dir / "train_state"):
        for stale in folder.glob(".*"):
            if stale.is_file() and stale.name.startswith(
                (".model.safetensors.", ".config.json.", ".README.md.", ".state.pt.")
            ):
                log.info("removing %s, left by an interrupted write", stale)
                stale.unlink()
