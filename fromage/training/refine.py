"""Retrieval-head refinement: a second, cheap stage after the joint loop.

Once `[RET]` is fixed, the hidden state at `[RET]` for a given caption no longer changes, so
the two retrieval maps and the temperature can be trained against *cached* states: a step costs
two small matmuls instead of a pass through the LM. The losses are the paper's (symmetric
InfoNCE with in-batch negatives; same feature dropout and cached augmented views); only the
parameters that update differ from the joint step. On 2 CPU cores the joint loop fits ~100
steps in its budget, while retrieval keeps improving for over a thousand (DESIGN §7 probe:
a linear probe on fixed `[RET]` states beats the joint recipe on both emoji styles).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..embed import StateCache, fill_states, layout_prompt, prompt_states, ret_states
from ..losses import contrastive_loss
from ..model import FromageModel
from .prefixes import RowSubset
from .step import StepData
from .tasks import TaskSampler
from .texts import TrainTexts, retrieval_variants

log = logging.getLogger(__name__)


@dataclass
class ContextRows:
    """Context prompts (stories, chats, "[apple] and [banana] show me another fruit") for
    refinement: rows of the state table and the examples they should retrieve, and the share
    of each batch they take."""

    rows: torch.Tensor
    """(C,) rows of `states`."""
    targets: torch.Tensor
    """(C,) example indices (rows of `text_of_example`)."""
    share: float


@dataclass
class RefineResult:
    steps: int
    first_loss: float
    last_loss: float


def pick_texts(
    text_of_example: torch.Tensor,
    idx: torch.Tensor,
    generator: torch.Generator,
    variant_share: float | torch.Tensor = 0.5,
) -> torch.Tensor:
    """Rows of the state table for examples `idx`. text_of_example is (N,) one text per example,
    or (N, V): column 0 the caption, columns 1.. its variants (request forms, dialogues); a
    variant is drawn with probability `variant_share` (one number, or (N,) per example),
    uniformly among the columns."""
    rows = text_of_example[idx]
    if rows.dim() == 1 or rows.shape[1] == 1:
        return rows.reshape(-1)
    n = rows.shape[0]
    share = variant_share[idx] if isinstance(variant_share, torch.Tensor) else variant_share
    variant = torch.rand(n, generator=generator) < share
    column = torch.randint(1, rows.shape[1], (n,), generator=generator) * variant
    return rows[torch.arange(n), column]


def refine_retrieval(
    model: FromageModel,
    states: torch.Tensor,
    text_of_example: torch.Tensor,
    features: torch.Tensor,
    group_ids: torch.Tensor,
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    variant_share: float | torch.Tensor = 0.5,
    contexts: ContextRows | None = None,
) -> RefineResult:
    """Train `text_ret_map`, `image_ret_map` and `logit_scale` on fixed `[RET]` states.

    states: (T, d) from `embed.ret_states`; text_of_example: (N,) or (N, V) rows of `states` per
    example (`pick_texts`, variants drawn with probability `variant_share`);
    features: (V, N, F) cached views (view 0 is the image itself); group_ids: (N,) examples
    that share a caption (never each other's negatives). Cosine decay from `lr` to 10%.
    Everything else in the model is untouched.
    """
    n = int(text_of_example.shape[0])
    if n < 2:
        raise ValueError(f"retrieval refinement needs at least 2 examples, got {n}")
    device = model.ret_embedding.device
    params = [*model.text_ret_map.parameters(), *model.image_ret_map.parameters(), model.logit_scale]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, n)
    n_context = round(batch_size * contexts.share) if contexts is not None and len(contexts.rows) else 0
    n_example = batch_size - n_context
    order: list[int] = []
    context_order: list[int] = []
    was_training = model.training
    model.train()
    first = last = float("nan")
    bar = tqdm(range(steps), desc="refine retrieval", unit="step", leave=False, disable=not progress)
    try:
        for step in bar:
            idx = _next(order, n_example, n, rng)
            drawn = (
                _next(context_order, n_context, len(contexts.rows), rng) if contexts and n_context else None
            )
            view = torch.randint(0, features.shape[0], (batch_size,), generator=generator)
            for group in optimizer.param_groups:
                group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(steps, 1))))
            rows = pick_texts(text_of_example, idx, generator, variant_share)
            if contexts is not None and drawn is not None:
                rows = torch.cat([rows, contexts.rows[drawn]])
                idx = torch.cat([idx, contexts.targets[drawn]])
            text = model.text_embeddings(states[rows].to(device))
            image = model.image_embeddings(features[view, idx].to(device))
            loss, _ = contrastive_loss(text, image, model.logit_scale, group_ids[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last = float(loss.detach())
            if step == 0:
                first = last
            if step % 50 == 0:
                bar.set_postfix(loss=f"{last:.3f}")
    finally:
        model.train(was_training)
    return RefineResult(steps, first, last)


def _next(order: list[int], k: int, n: int, rng: random.Random) -> torch.Tensor:
    """The next `k` of an epoch-wise shuffle of range(n) (refilled from `rng` when short)."""
    while len(order) < k:
        fresh = list(range(n))
        rng.shuffle(fresh)
        order += fresh
    taken = torch.tensor(order[:k], dtype=torch.long)
    del order[:k]
    return taken


def refine_after_loop(
    model: FromageModel,
    data: StepData,
    texts: TrainTexts,
    tokenizer: Any,
    config: TrainConfig,
    run_refinement: bool,
) -> tuple[dict[str, float], StateCache]:
    """After the joint loop `[RET]` is final, so each training caption's `[RET]` state is fixed:
    compute them once (a sample past `refine_max_examples`), refine the retrieval maps on them
    when `run_refinement`, and return the states for validation to reuse.
    → (refinement metrics, text ids → `[RET]` state)."""
    split = data.split
    chosen = list(range(len(split)))
    if len(chosen) > config.refine_max_examples:
        chosen = sorted(random.Random(config.seed + 2).sample(chosen, config.refine_max_examples))
    chosen_texts = sorted({int(data.text_of_example[i]) for i in chosen})
    states = ret_states(model, RowSubset(data.prefixes, chosen_texts))
    state_cache: StateCache = {tuple(texts.distinct[j]): states[k] for k, j in enumerate(chosen_texts)}
    if not (config.refine_steps and run_refinement):
        return {}, state_cache
    t0 = time.time()
    # Requests ("show me a red apple") join the captions here: their [RET] states come from
    # the final [RET], and the retrieval maps learn to place both forms on the image.
    # Dialogues whose answers determine the image join them for images with questions.
    form_texts, shares = retrieval_variants([split.examples[i] for i in chosen], tokenizer, config)
    fill_states(model, [t for f in form_texts for t in f], data.special, state_cache)
    row_of = {text: i for i, text in enumerate(state_cache)}
    width = max(len(f) for f in form_texts)
    captions = texts.captions
    table = torch.tensor(  # (examples, 1 + width): the caption's state row, then its variants'
        [
            [row_of[tuple(captions[i])]]
            + [row_of[tuple(f[j % len(f)] if f else captions[i])] for j in range(width)]
            for i, f in zip(chosen, form_texts, strict=True)
        ]
    )
    whole = len(chosen) == len(split)
    state_table = torch.stack(list(state_cache.values()))
    contexts = None
    if config.refine_contexts and config.refine_context_share:
        context_states, targets = _context_states(model, data, config, chosen)
        rows = torch.arange(len(state_table), len(state_table) + len(targets))
        state_table = torch.cat([state_table, context_states])
        contexts = ContextRows(rows, targets, config.refine_context_share)
    result = refine_retrieval(
        model,
        state_table,
        table,
        split.features if whole else split.features[:, torch.tensor(chosen)],
        data.group_ids if whole else data.group_ids[torch.tensor(chosen)],
        config.refine_steps,
        batch_size=config.refine_batch_size,
        lr=config.refine_lr,
        seed=config.seed,
        variant_share=torch.tensor(shares),
        contexts=contexts,
    )
    log.info(
        "retrieval refinement: %d steps, loss %.3f -> %.3f", result.steps, result.first_loss, result.last_loss
    )
    metrics = {
        "refine/first_loss": result.first_loss,
        "refine/last_loss": result.last_loss,
        "refine/seconds": time.time() - t0,
        "refine/contexts": 0 if contexts is None else len(contexts.rows),
    }
    return metrics, state_cache


def _context_states(
    model: FromageModel, data: StepData, config: TrainConfig, chosen: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`config.refine_contexts` prompts drawn from the task mix (the loop's kinds, families and
    templates; images read as themselves, view 0) → ((C, d) `[RET]` states, (C,) positions of
    their targets in `chosen`). Prompts whose target is outside `chosen` are dropped."""
    if data.tokenize is None:
        raise ValueError("refinement contexts need StepData.tokenize")
    position = {row: j for j, row in enumerate(chosen)}
    sampler = TaskSampler(data.split.examples, config.tasks)
    queries = [
        q
        for q in sampler.draw(config.refine_contexts, random.Random(config.seed + 3))
        if q.target in position
    ]
    k, features = model.config.num_visual_tokens, data.split.features[0]
    rows, images = [], []
    for q in queries:
        ids, at = layout_prompt(q.pieces, data.tokenize, data.special.bos, k)
        rows.append(ids)
        images.append(torch.stack([features[int(q.pieces[i])] for i in at]) if at else None)
    states = prompt_states(model, rows, images, data.special.pad, desc="refinement contexts")
    targets = torch.tensor([position[q.target] for q in queries], dtype=torch.long)
    log.info("refinement contexts: %d prompts", len(queries))
    return states, targets
