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
from ..data.dialogues import Dialogue, answer_text, ask, determining_dialogue, format_rounds, random_dialogue
from ..data.examples import Example
from ..data.requests import request_forms
from ..tokens import tokenize_captions


@dataclass
class TrainTexts:
    captions: list[list[int]]
    """Per training example, its caption's ids."""
    qa_forms: list[list[list[int]]]
    """Per training example, `Q: … A: …` dialogues (empty without questions)."""
    qa_context: list[list[int]]
    """Per dialogue in `qa_forms`, its leading tokens that are context, not targets (all but
    the last answer with `qa_answer_only`, else 0)."""
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
    qa_forms, qa_context = [], []
    for e in split.examples:
        forms = [
            random_dialogue(e.qa, forms_rng, max_rounds=config.data.qa_caption_rounds)
            for _ in range(config.data.qa_caption_forms if e.qa else 0)
        ]
        ids, context = _dialogue_ids(tokenizer, forms, config.data.qa_answer_only, max_tokens * 3)
        qa_forms.append(ids)
        qa_context.append(context)
    group_index: dict[str, int] = {}
    group_ids = torch.tensor(
        [group_index.setdefault(e.group or f"#{i}", len(group_index)) for i, e in enumerate(split.examples)]
    )
    text_index: dict[tuple[int, ...], int] = {}
    text_of_example = torch.tensor([text_index.setdefault(tuple(t), len(text_index)) for t in captions])
    distinct = [list(t) for t in text_index]
    return TrainTexts(
        captions, qa_forms, qa_context, val_captions, val_requests, group_ids, distinct, text_of_example
    )


def _dialogue_ids(
    tokenizer: Any, dialogues: list[Dialogue], answer_only: bool, max_tokens: int
) -> tuple[list[list[int]], list[int]]:
    """Dialogues → (ids, context length) each. With `answer_only` the text up to the last
    answer and the answer are tokenised apart, as a prompt and its answer are at inference
    (the context is cut from the left past `max_tokens`); else the whole text is the target."""
    if not answer_only:
        return tokenize_captions(tokenizer, [d.text() for d in dialogues], max_tokens), [0] * len(dialogues)
    ids, context = [], []
    for d in dialogues:
        question, answer = d.rounds[-1]
        prompt = " ".join(p for p in (format_rounds(d.rounds[:-1]), ask(question)) if p)
        head = tokenize_captions(tokenizer, [prompt], 10**9)[0][-max_tokens:]
        tail = tokenize_captions(tokenizer, [answer_text(answer)], max_tokens)[0]
        ids.append(head + tail)
        context.append(len(head))
    return ids, context


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
