"""What every benchmark writes: `results.json` (every metric, the settings, model and data
digests, counts of what was skipped) and `results.md` (one Markdown table per task)."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_bytes


@dataclass
class Row:
    """One line of a table: who ranked (`fromage` or `baseline`), under which setting."""

    system: str
    setting: str
    metrics: dict[str, float | None]
    """None where the system cannot run this setting (the reason is in `note`)."""
    note: str = ""


@dataclass
class TaskResult:
    task: str
    rows: list[Row]
    counts: dict[str, int] = field(default_factory=dict)
    """Queries, gallery size, and everything skipped, by reason."""
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def metric(self, system: str, setting: str, name: str) -> float | None:
        for row in self.rows:
            if row.system == system and row.setting == setting:
                return row.metrics.get(name)
        raise KeyError(f"no row for {system} / {setting} in {self.task}")

    def table(self) -> str:
        """Markdown: one row per (system, setting); metrics as columns, `n/a` where absent."""
        names = list(dict.fromkeys(n for r in self.rows for n in r.metrics))
        lines = [
            f"| system | setting | {' | '.join(names)} |",
            "|---|---|" + "---:|" * len(names),
        ]
        for r in self.rows:
            cells = [_cell(r.metrics.get(n)) for n in names]
            lines.append(f"| {r.system} | {r.setting} | {' | '.join(cells)} |")
        notes = [f"- {r.system} / {r.setting}: {r.note}" for r in self.rows if r.note] + [
            f"- {n}" for n in self.notes
        ]
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        return "\n".join(
            [f"### {self.task}", "", *lines, "", *([f"Counts: {counts}."] if counts else []), *notes]
        )


def summary_table(
    results: list[TaskResult], metrics: tuple[str, ...] = ("R@1", "R@5", "R@10", "MRR", "exact")
) -> str:
    """Every task's rows in one Markdown table (the per-task tables have every metric)."""
    lines = [f"| task | system | setting | {' | '.join(metrics)} |", "|---|---|---|" + "---:|" * len(metrics)]
    for result in results:
        for r in result.rows:
            if any(r.metrics.get(m) is not None for m in metrics):
                cells = " | ".join("" if r.metrics.get(m) is None else _cell(r.metrics[m]) for m in metrics)
                lines.append(f"| {result.task} | {r.system} | {r.setting} | {cells} |")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_results(
    out_dir: str | Path,
    results: list[TaskResult],
    model_info: dict[str, Any],
    data_info: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """`out_dir/results.json` + `out_dir/results.md`; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "model": model_info,
        "data": data_info,
        "tasks": {r.task: asdict(r) for r in results},
        **(extra or {}),
    }
    atomic_write_bytes(out / "results.json", (json.dumps(payload, indent=2) + "\n").encode())
    md = "\n\n".join(r.table() for r in results) + "\n"
    atomic_write_bytes(out / "results.md", md.encode())
    return out / "results.json"
