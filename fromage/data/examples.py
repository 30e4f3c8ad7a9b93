"""The unit every reader produces: one image path and its caption."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    image: str
    """Path of the image file."""
    caption: str
    source: str
    """Which dataset it came from (`emoji-google`, `easyvqa`, a file name)."""
    group: str = ""
    """Examples with the same non-empty group describe the same thing (same caption or concept):
    the contrastive loss does not treat them as negatives of each other."""
    qa: tuple[tuple[str, str], ...] = ()
    """Questions about the image with their answers (easy-VQA); the recipe trains on dialogues
    made of them beside the caption (data/dialogues.py)."""
