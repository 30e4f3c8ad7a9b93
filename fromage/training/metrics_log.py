"""Where a run's numbers go: `metrics.jsonl` (one JSON object per line: step, time, values)
and, when tensorboard is installed, its event files."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, out_dir: Path):
        self.file = open(out_dir / "metrics.jsonl", "a")  # noqa: SIM115  (closed by close())
        self.writer = _tensorboard(out_dir)

    def log(self, step: int, values: dict[str, Any]) -> None:
        self.file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _tensorboard(out_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    try:
        return SummaryWriter(str(out_dir / "tensorboard"))
    except Exception:  # tensorboard missing or broken: metrics.jsonl still has everything
        return None
