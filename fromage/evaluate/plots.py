"""Pictures for benchmark reports (matplotlib, the `eval` extra): example queries with their
top-5 retrieved images, green frames where the image is correct."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class RetrievalExample(Protocol):
    title: str
    query: str
    images: list[str]
    correct: list[bool]


def save_retrieval_examples(path: str | Path, examples: Sequence[RetrievalExample], top: int = 5) -> Path:
    """One row per example: the query text, then its `top` images left to right."""
    try:
        # A Figure on its own Agg canvas: no pyplot, so the process's backend (a notebook's,
        # say) is left as it was.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'fromage[eval]'") from err
    from ..data.images import load_image

    if not examples:
        raise ValueError("no examples to plot")
    fig = Figure(figsize=(2.0 * (top + 1), 2.2 * len(examples)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(examples), top + 1, squeeze=False)
    for row, example in zip(axes, examples, strict=True):
        row[0].axis("off")
        query = textwrap.fill(example.query, 28)
        if len(query) > 420:
            query = query[:417] + "…"
        row[0].text(0, 1, f"{example.title}\n\n{query}", va="top", ha="left", fontsize=7, wrap=True)
        for j, ax in enumerate(row[1:]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(example.images):
                ax.axis("off")
                continue
            ax.imshow(load_image(Path(example.images[j])))
            colour = "#1a9641" if example.correct[j] else "#d7191c"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
            ax.set_title(f"#{j + 1}" + (" ✓" if example.correct[j] else ""), fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    return out
