"""The text families a run trains and validates on, tokenised once before the loop.

- captions, one per training example (captioning pass and retrieval pass);
- question→answer turns per image with questions (captioning pass, `qa_caption_share`);
- validation captions, and requests ("show me a red apple") for the emoji validation sets;
- retrieval variants per example for refinement: dialogues that settle the image, or requests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from ..config import TrainConfig
from ..data.dataset import Split
from ..data.dialogues import determining_dialogue, random_dialogue
from ..data.examples import Example
from ..data.requests import request_forms
from ..tokens import tokenize_captions


@dataclass
class TrainTexts:
    captions: list[list[int]]
    """Per training example, its caption's ids."""
    qa_forms: list[list[list[int]]]
    """Per training example, one-turn `Q: … A: …` dialogues (empty without questions)."""
    val_captions: dict[str, list[list[int]]]
    val_requests: dict[str, list[list[int]]]
    """Per emoji validation set, a request for each example (its first request form)."""
    group_ids: torch.Tensor
    """(N,) one id per distinct group (examples without a group are their own)."""
    distinct: list[list[int]]
    """Distinct captions (easy-VQA repeats them): the retrieval-pass prefix table's rows."""
    text_of_example: torch.Tensor
    """(N,) example → its row in `distinct`."""


def tokenize_families(
    tokenizer: Any, split: Split, val_splits: dict[str, Split], config: TrainConfig
) -> TrainTexts:
    max_tokens = config.data.max_caption_tokens
    captions = tokenize_captions(tokenizer, [e.caption for e in split.examples], max_tokens)
    val_captions = {
        n: tokenize_captions(tokenizer, [e.caption for e in s.examples], max_tokens)
        for n, s in val_splits.items()
    }
    val_requests = {
        n: tokenize_captions(tokenizer, [request_forms(e.caption, 1)[0] for e in s.examples], max_tokens + 8)
        for n, s in val_splits.items()
        if n.startswith("emoji")
    }
    forms_rng = random.Random(config.seed)
    qa_forms = [
        tokenize_captions(
            tokenizer,
            [
                random_dialogue(e.qa, forms_rng, max_rounds=1).text()
                for _ in range(config.data.qa_caption_forms)
            ],
            max_tokens * 3,
        )
        if e.qa
        else []
        for e in split.examples
    ]
    group_index: dict[str, int] = {}
    group_ids = torch.tensor(
        [group_index.setdefault(e.group or f"#{i}", len(group_index)) for i, e in enumerate(split.examples)]
    )
    text_index: dict[tuple[int, ...], int] = {}
    text_of_example = torch.tensor([text_index.setdefault(tuple(t), len(text_index)) for t in captions])
    distinct = [list(t) for t in text_index]
    return TrainTexts(captions, qa_forms, val_captions, val_requests, group_ids, distinct, text_of_example)


def retrieval_variants(
    examples: list[Example], tokenizer: Any, config: TrainConfig
) -> tuple[list[list[list[int]]], list[float]]:
    """Per example, the texts refinement may read instead of its caption, and how often:
    dialogues that determine the image (images with questions), else request forms."""
    rng = random.Random(config.seed + 1)
    data = config.data
    max_tokens = data.max_caption_tokens
    variants, shares = [], []
    for e in examples:
        dialogues = [determining_dialogue(e.qa, rng) for _ in range(data.qa_retrieval_forms)] if e.qa else []
        found = [d.text() for d in dialogues if d is not None]
        if found:
            variants.append(tokenize_captions(tokenizer, found, max_tokens * 4))
            shares.append(data.qa_retrieval_share)
        else:
            forms = request_forms(e.caption, data.request_forms)
            variants.append(tokenize_captions(tokenizer, forms, max_tokens + 8) if forms else [])
            shares.append(data.request_share)
    return variants, shares
