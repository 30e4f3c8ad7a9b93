"""Dialogues about one easy-VQA image, in the VisDial query form `Q: q A: a.` per round.

A dialogue is made of the image's own question/answer pairs. Rounds are chosen so that their
answers pin down the image's colour and shape: a retrieval benchmark built from them can then
reach R@1 = 1.0 (any image of that colour and shape is correct; DESIGN §7 found random rounds
cap it near 0.43). The training recipe uses the same builder on training images, so the
retrieval maps learn to read dialogues as well as captions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from .builtin import determined_by, qa_facts

Round = tuple[str, str]


@dataclass(frozen=True)
class Dialogue:
    rounds: tuple[Round, ...]

    def text(self) -> str:
        return format_rounds(self.rounds)


def format_round(question: str, answer: str) -> str:
    """One round as VisDial queries write it: `Q: what color is the shape? A: red.`"""
    return ask(question) + answer_text(answer)


def ask(question: str) -> str:
    """A round up to its answer, `Q: what color is the shape? A:` (what answer selection reads)."""
    question = question.strip()
    if not question.endswith("?"):
        question += "?"
    return f"Q: {question} A:"


def answer_text(answer: str) -> str:
    """The rest of a round after `ask`: ` red.`"""
    return f" {answer.strip()}."


def format_rounds(rounds: Sequence[Round]) -> str:
    return " ".join(format_round(q, a) for q, a in rounds)


def determining_dialogue(
    qa: Sequence[Round], rng: random.Random, min_rounds: int = 2, max_rounds: int = 4
) -> Dialogue | None:
    """`min_rounds`..`max_rounds` of an image's (question, answer) pairs whose answers
    determine its colour and shape, in random order; None when all its pairs together cannot
    (the image is then not a query)."""
    pairs = list(qa)
    color, shape = determined_by(pairs)
    if len(pairs) < min_rounds or color is None or shape is None:
        return None
    says_color = [p for p in pairs if qa_facts(*p).color == color]
    says_shape = [p for p in pairs if qa_facts(*p).shape == shape]
    target = rng.randint(min_rounds, min(max_rounds, len(pairs)))
    if says_color and says_shape:
        chosen = [rng.choice(says_color)]
        if qa_facts(*chosen[0]).shape != shape:
            chosen.append(rng.choice(says_shape))
        rest = [p for p in pairs if p not in chosen]
        rng.shuffle(rest)
        chosen += rest[: max(0, target - len(chosen))]
        if determined_by(chosen) == (color, shape):
            rng.shuffle(chosen)
            return Dialogue(tuple(chosen))
    # Determined only through exclusions ("no circle", "no triangle"): grow a random subset.
    order = pairs[:]
    rng.shuffle(order)
    for stop in range(min_rounds, min(max_rounds, len(order)) + 1):
        if determined_by(order[:stop]) == (color, shape):
            return Dialogue(tuple(order[:stop]))
    return None


def random_dialogue(qa: Sequence[Round], rng: random.Random, max_rounds: int = 3) -> Dialogue:
    """1..`max_rounds` of the pairs in random order (for the captioning pass: the model learns
    to answer questions about the image it sees)."""
    if not qa:
        raise ValueError("the image has no question/answer pairs")
    pairs = list(qa)
    rng.shuffle(pairs)
    return Dialogue(tuple(pairs[: rng.randint(1, min(max_rounds, len(pairs)))]))
