"""The training loop (DESIGN §3), top to bottom.

Each step of the joint loop runs (1) the captioning pass `[img][BOS] caption [EOS]` — with probability
`interleave_prob` two pairs packed per row — and (2) the retrieval pass `[BOS] caption [RET]`
with the LM loss including `[RET]` and symmetric InfoNCE. Image features come from the disk
cache (the frozen encoder runs once per image and view, never per step). Only the three maps,
`[RET]` and the temperature are in the optimiser. After the loop, the retrieval maps are refined
on cached `[RET]` states (refine.py), which costs seconds per thousand steps.

Writes `output_dir/checkpoint/` (config.json + model.safetensors: trained tensors only),
`output_dir/train_state/` (optimiser, schedule, RNG, step, data position) and
`output_dir/metrics.jsonl`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backbones import load_encoder, load_lm
from ..checkpoint import save_model
from ..config import TrainConfig, save_json, to_dict
from ..data.collate import caption_batch, retrieval_prefix_batch
from ..data.dataset import Split, build_examples, extract_features
from ..data.dialogues import determining_dialogue, random_dialogue
from ..data.examples import Example
from ..data.readers import BadInputLog
from ..data.requests import request_forms
from ..embed import PrefixSource, fill_states, ret_states
from ..fileio import atomic_write_bytes
from ..losses import caption_loss, contrastive_loss, linear_cross_entropy, ret_token_loss
from ..model import FromageModel, TextPrefix
from ..tokens import IGNORE_INDEX, SpecialTokens, tokenize_captions
from .distributed import Processes, init_processes
from .refine import refine_retrieval
from .validate import validate

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    step: int
    checkpoint: Path
    metrics: dict[str, float]
    trainable_parameters: int
    peak_rss_mb: float
    samples_per_second: float
    bad_inputs: str
    is_main: bool = True
    """False in the other processes of a data-parallel run (they hold no final metrics)."""


def use_bf16(config: TrainConfig, device: torch.device) -> bool:
    if config.precision == "bf16":
        return True
    if config.precision == "fp32":
        return False
    # On CPUs here bf16 made the backward pass slower (DESIGN §7): auto means CUDA only.
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def lr_at(step: int, config: TrainConfig, time_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak at the end of the run: `max_steps`
    or, with a time budget, `time_progress` (share of the budget used), whichever is further."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, max((step - config.warmup_steps) / span, time_progress))
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def precompute_prefixes(
    model: FromageModel, texts: list[list[int]], special: SpecialTokens, chunk: int = 64
) -> TextPrefix:
    """The frozen part of the retrieval pass for each text, computed once (row i ↔ texts[i]).
    Texts are run in length order so little compute goes to padding."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    parts = []
    for start in tqdm(range(0, len(order), chunk), desc="text prefixes", leave=False):
        rows = order[start : start + chunk]
        ids, mask = retrieval_prefix_batch([texts[i] for i in rows], special)
        device = model.ret_embedding.device
        parts.append(model.encode_text_prefix(ids.to(device), mask.to(device)))
    table = TextPrefix.cat(parts)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return table.select(inverse)


class OnTheFlyPrefixes:
    """The frozen retrieval-pass prefixes computed when a step asks for them, for collections
    whose precomputed table would not fit in `prefix_cache_mb`: one frozen forward over the
    step's texts (still no autograd). `select` returns what the table's `select` would."""

    def __init__(self, model: FromageModel, texts: list[list[int]], special: SpecialTokens):
        self.model, self.texts, self.special = model, texts, special

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, rows: torch.Tensor) -> TextPrefix:
        ids, mask = retrieval_prefix_batch([self.texts[r] for r in rows.tolist()], self.special)
        device = self.model.ret_embedding.device
        return self.model.encode_text_prefix(ids.to(device), mask.to(device))


class _Rows:
    """Some rows of a prefix source, renumbered 0..len-1."""

    def __init__(self, source: PrefixSource, rows: list[int]):
        self.source, self.rows = source, torch.tensor(rows, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, rows: torch.Tensor) -> TextPrefix:
        return self.source.select(self.rows[rows])


def prefix_table_mb(model: FromageModel, texts: list[list[int]], special: SpecialTokens) -> float:
    """Size the precomputed prefix table would take: (texts x longest text) positions, each
    holding every layer's keys and values and a hidden state (measured on one probe row)."""
    ids, mask = retrieval_prefix_batch([min(texts, key=len)], special)
    device = model.ret_embedding.device
    probe = model.encode_text_prefix(ids.to(device), mask.to(device))
    tensors = (probe.mask, probe.targets, probe.last_hidden, probe.frozen_lse, probe.frozen_target_logit)
    probe_bytes = sum(t.numel() * t.element_size() for t in (*tensors, probe.keys, probe.values))
    per_position = probe_bytes / ids.shape[1]
    return per_position * len(texts) * (max(len(t) for t in texts) + 1) / 2**20


def pick_caption_texts(
    texts: list[list[int]],
    qa_forms: list[list[list[int]]],
    idx: list[int],
    share: float,
    generator: torch.Generator,
) -> list[list[int]]:
    """What the captioning pass reads for each image in `idx`: its caption, or with probability
    `share` one of its dialogues (images that have some), drawn uniformly."""
    draws = torch.rand(len(idx), generator=generator).tolist()
    picks = torch.randint(0, 1 << 30, (len(idx),), generator=generator).tolist()
    out = []
    for i, draw, pick in zip(idx, draws, picks, strict=True):
        forms = qa_forms[i]
        out.append(forms[pick % len(forms)] if forms and draw < share else texts[i])
    return out


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


def train_step(
    model: FromageModel,
    split: Split,
    caption_texts: list[list[int]],
    prefixes: PrefixSource,
    text_of_example: torch.Tensor,
    group_ids: torch.Tensor,
    caption_idx: list[int],
    retrieval_idx: list[int],
    special: SpecialTokens,
    interleave: bool,
    config: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
    scale: float = 1.0,
    procs: Processes | None = None,
) -> dict[str, float]:
    """Both passes on one micro-batch; backward with `scale` (1 / accumulation steps).
    caption_texts[j] is what the captioning pass reads for image caption_idx[j].

    The indices are the global batch; with several processes each runs its contiguous shard.
    Random draws are made for the whole global batch and then sharded, and the losses are
    divided by global counts, so the processes' gradients sum to one process's gradient
    (`Processes.sum_gradients`) and the returned values are the global batch's."""
    procs = procs or Processes(0, 1, device)
    views = split.features.shape[0]
    cap_views = procs.shard(torch.randint(0, views, (len(caption_idx),), generator=generator).tolist())
    ret_views = torch.tensor(
        procs.shard(torch.randint(0, views, (len(retrieval_idx),), generator=generator).tolist())
    )
    p_drop = model.config.feature_dropout
    keep = None
    if p_drop > 0:  # (B, F) feature-dropout mask for the retrieval pass
        keep = torch.rand(len(retrieval_idx), split.features.shape[2], generator=generator) >= p_drop
        keep = keep[procs.shard(list(range(len(retrieval_idx))))].to(device)
    caption_idx, caption_texts = procs.shard(caption_idx), procs.shard(caption_texts)
    retrieval_idx = procs.shard(retrieval_idx)

    # (1) captioning pass: full backward through the LM into the visual tokens.
    batch = caption_batch(caption_texts, model.config.num_visual_tokens, special, interleave)
    rows = torch.tensor([caption_idx[j] for j in batch.image_order])
    cap_feats = split.features[torch.tensor([cap_views[j] for j in batch.image_order]), rows].to(device)
    # (2) retrieval pass: the prefix runs without autograd; only [RET] carries gradients.
    ret_prefix = prefixes.select(text_of_example[torch.tensor(retrieval_idx)])
    # Loss divisors: labelled caption positions and retrieval-pass positions, all processes.
    counts = procs.sum(
        torch.tensor(
            [(batch.labels[:, 1:] != IGNORE_INDEX).sum(), ret_prefix.mask.sum()], dtype=torch.float64
        )
    ).tolist()

    hidden, targets = model.caption_hidden(
        batch.input_ids.to(device), batch.attention_mask.to(device), cap_feats, batch.labels.to(device)
    )
    head = model.lm.head_linear()
    if head is not None:  # the (N, V+1) logits are never held whole (losses.linear_cross_entropy)
        weight, bias = head
        loss_cap = linear_cross_entropy(hidden, weight, model.ret_output_row, targets, bias, counts[0])
    else:
        loss_cap = caption_loss(model.full_logits(hidden), targets, counts[0])
    ret = model.retrieval_from_prefix(ret_prefix)
    loss_ret_lm = ret_token_loss(
        ret.frozen_lse, ret.frozen_target_logit, ret.ret_logit, ret.target_is_ret, counts[1]
    )
    text_emb = model.text_embeddings(ret.ret_hidden)
    image_emb = model.image_embeddings(
        split.features[ret_views, torch.tensor(retrieval_idx)].to(device), keep
    )
    groups = group_ids[torch.tensor(retrieval_idx)].to(device)
    loss_con, con_logits = contrastive_loss(text_emb, image_emb, model.logit_scale, groups)

    weights = (config.caption_loss_weight, config.retrieval_lm_loss_weight, config.contrastive_loss_weight)
    total = weights[0] * loss_cap + weights[1] * loss_ret_lm + weights[2] * loss_con
    (total * scale).backward()
    # The captioning and LM parts are this shard's share of the global mean; the contrastive
    # loss is computed over the gathered global batch by every process.
    cap, ret_lm = procs.sum(torch.stack([loss_cap.detach(), loss_ret_lm.detach()])).tolist()
    con = float(loss_con.detach())
    global_batch = con_logits.shape[0]
    return {
        "loss": weights[0] * cap + weights[1] * ret_lm + weights[2] * con,
        "caption_loss": cap,
        "ret_lm_loss": ret_lm,
        "contrastive_loss": con,
        "contrastive_acc": float(
            (con_logits.argmax(1) == torch.arange(global_batch, device=con_logits.device)).float().mean()
        ),
    }


def train(config: TrainConfig) -> TrainResult:
    start_time = time.time()
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    # Every process runs the same code on the same seeds and the whole global batch's random
    # draws; only the forward/backward work is split (train_step). The main process alone
    # writes files, validates and refines.
    procs = init_processes(config.device)
    device = procs.device
    if not procs.is_main:
        logging.getLogger("fromage").setLevel(logging.WARNING)
    bf16 = use_bf16(config, device)
    if bf16:
        config.model.lm.dtype = "bfloat16"

    lm, tokenizer = load_lm(config.model.lm, device=device)
    encoder = load_encoder(config.model.encoder, device=device)
    special = SpecialTokens.from_tokenizer(tokenizer)

    bad = BadInputLog()
    train_examples, val_examples = build_examples(config.data, bad)
    # The main process fills the feature cache; the others then read it.
    if not procs.is_main:
        procs.barrier()
    split = extract_features(
        train_examples, encoder, bad, views=config.data.augment_views, desc="train features"
    )
    val_splits = {
        name: extract_features(ex, encoder, bad, desc=f"{name} features") for name, ex in val_examples.items()
    }
    if procs.is_main:
        procs.barrier()
    seen = len(train_examples) + sum(len(v) for v in val_examples.values())
    bad.check(seen, config.data.max_bad_fraction)
    log.info("data: %d training examples; %s", len(split), bad.summary())

    max_tokens = config.data.max_caption_tokens
    texts = tokenize_captions(tokenizer, [e.caption for e in split.examples], max_tokens)
    val_texts = {
        n: tokenize_captions(tokenizer, [e.caption for e in s.examples], max_tokens)
        for n, s in val_splits.items()
    }
    # Requests ("show me a red apple") are scored on the emoji sets, in their first form.
    val_requests = {
        n: tokenize_captions(tokenizer, [request_forms(e.caption, 1)[0] for e in s.examples], max_tokens + 8)
        for n, s in val_splits.items()
        if n.startswith("emoji")
    }
    # Questions with their answers, for the captioning pass of images that have some (easy-VQA).
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

    model = FromageModel(config.model, lm, encoder).to(device)
    if config.shard_lm and procs.distributed:
        log.info(
            "frozen LM: %d decoder blocks sharded over %d processes", lm.shard_layers(), procs.world_size
        )
    model.set_feature_stats(split.features[0])
    # Captions repeat (easy-VQA has 24): the frozen prefix is computed once per distinct text.
    text_index: dict[tuple[int, ...], int] = {}
    text_of_example = torch.tensor([text_index.setdefault(tuple(t), len(text_index)) for t in texts])
    distinct = [list(t) for t in text_index]
    table_mb = prefix_table_mb(model, distinct, special)
    prefixes: PrefixSource
    if table_mb <= config.prefix_cache_mb:
        prefixes = precompute_prefixes(model, distinct, special)
        model.set_text_stats(ret_states(model, prefixes))
    else:
        log.info(
            "retrieval-pass prefixes of %d texts would take %.0f MB (prefix_cache_mb %.0f): "
            "computed in each step instead",
            len(distinct),
            table_mb,
            config.prefix_cache_mb,
        )
        prefixes = OnTheFlyPrefixes(model, distinct, special)
        # [RET]-state statistics (for standardising) from a sample of the texts.
        sample = sorted(random.Random(config.seed).sample(range(len(distinct)), min(len(distinct), 4096)))
        model.set_text_stats(ret_states(model, _Rows(prefixes, sample)))
    params = model.trainable_parameters()
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    caption_sampler = EpochSampler(len(split), config.seed)
    retrieval_sampler = EpochSampler(len(split), config.seed + 1)
    generator = torch.Generator().manual_seed(config.seed)
    step = 0

    state_dir = out_dir / "train_state"
    if procs.is_main:
        _remove_stale_temporaries(out_dir)
    procs.barrier()
    if config.resume and (state_dir / "state.pt").exists():
        # The state is the same for any number of processes (samplers and draws are global).
        step = _load_state(state_dir, model, optimizer, caption_sampler, retrieval_sampler, generator)
        log.info("resumed from step %d", step)
    if procs.is_main:
        save_json(config, out_dir / "train_config.json")

    log.info(
        "trainable parameters: %d (%.2f M); %d process(es)", n_trainable, n_trainable / 1e6, procs.world_size
    )
    metrics_file = open(out_dir / "metrics.jsonl", "a") if procs.is_main else None
    writer = _tensorboard(out_dir) if procs.is_main else None
    bar = tqdm(
        total=None if config.max_minutes else config.max_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not procs.is_main,
    )
    samples = 0
    loop_start = time.time()
    last: dict[str, float] = {}
    model.train()
    # With a time budget, the final validation needs time too: it is held back from training.
    budget_s = 0.0
    if config.max_minutes:
        budget_s = (
            config.max_minutes * 60 - config.final_eval_reserve_minutes * 60 - (loop_start - start_time)
        )
        budget_s = max(budget_s, 1.0)
    time_progress = 0.0
    skipped_steps = streak = 0
    while step < config.max_steps:
        if config.stop_at_step and step >= config.stop_at_step:
            break
        if budget_s:
            # The main process's clock decides for all, so every process stops at the same step.
            mine = (time.time() - loop_start) / max(budget_s, 1e-9) if procs.is_main else 0.0
            time_progress = float(procs.sum(torch.tensor([mine], dtype=torch.float64)))
            if time_progress >= 1.0:
                log.info("time budget of %.1f min reached at step %d", config.max_minutes, step)
                break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config, time_progress)
        interleave = bool(torch.rand((), generator=generator) < config.interleave_prob)
        optimizer.zero_grad(set_to_none=True)
        parts = []
        for _ in range(config.grad_accum_steps):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                caption_idx = caption_sampler.take(config.batch_size)
                parts.append(
                    train_step(
                        model,
                        split,
                        pick_caption_texts(
                            texts, qa_forms, caption_idx, config.data.qa_caption_share, generator
                        ),
                        prefixes,
                        text_of_example,
                        group_ids,
                        caption_idx,
                        retrieval_sampler.take(config.retrieval_batch_size),
                        special,
                        interleave,
                        config,
                        generator,
                        device,
                        1.0 / config.grad_accum_steps,
                        procs,
                    )
                )
        procs.sum_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        if not (math.isfinite(float(grad_norm)) and all(math.isfinite(p["loss"]) for p in parts)):
            # A NaN/inf loss or gradient: the update is dropped, counted, and the run stops
            # once too many come in a row (the saved checkpoints stay finite).
            optimizer.zero_grad(set_to_none=True)
            skipped_steps += 1
            streak += 1
            log.warning(
                "step %d: non-finite loss %s or gradient norm %s; update skipped (%d in a row)",
                step,
                [p["loss"] for p in parts],
                float(grad_norm),
                streak,
            )
            if streak >= config.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{streak} steps in a row had a non-finite loss or gradient (limit "
                    f"max_nonfinite_steps={config.max_nonfinite_steps}); stopped at step {step}. "
                    f"The last checkpoint in {out_dir} holds finite weights; try a lower lr "
                    f"(now {config.lr}) or precision fp32."
                )
            continue
        streak = 0
        optimizer.step()
        if config.model.ret_norm_rescale:
            model.rescale_ret_embedding()
        step += 1
        samples += config.batch_size * config.grad_accum_steps
        last = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
        last.update(grad_norm=float(grad_norm), lr=optimizer.param_groups[0]["lr"])
        rate = samples / max(time.time() - loop_start, 1e-9)
        bar.set_postfix(loss=f"{last['loss']:.3f}", samples_s=f"{rate:.1f}")
        bar.update(1)
        if metrics_file is None:
            continue  # the other processes only train
        if step % config.log_every == 0 or step == config.max_steps:
            _log(metrics_file, writer, step, {**last, "samples_per_s": rate})
        if config.eval_every and step % config.eval_every == 0 and step < config.max_steps:
            _log(
                metrics_file,
                writer,
                step,
                _validate_all(model, val_splits, val_texts, special, tokenizer, config, False, {}),
            )
        if config.save_every and step % config.save_every == 0 and step < config.max_steps:
            _save(out_dir, model, optimizer, caption_sampler, retrieval_sampler, generator, step, config)
    bar.close()
    rate = samples / max(time.time() - loop_start, 1e-9)
    # The resumable state is the joint loop's; refinement below only rewrites the checkpoint.
    if procs.is_main:
        _save(out_dir, model, optimizer, caption_sampler, retrieval_sampler, generator, step, config)
    procs.barrier()
    sharded = config.shard_lm and procs.distributed
    procs.close()  # what follows runs in the main process alone
    if metrics_file is not None and sharded:
        model = _unsharded(model, config, device)
    if metrics_file is None:
        return TrainResult(
            step, out_dir / "checkpoint", {}, n_trainable, peak_rss_mb(), rate, bad.summary(), is_main=False
        )
    # [RET] is final now: its state per training caption is fixed, so the retrieval maps get
    # many cheap steps on cached states (refine.py), and validation reuses the same states.
    # Past `refine_max_examples`, refinement reads a random sample of the examples.
    chosen = list(range(len(split)))
    if len(chosen) > config.refine_max_examples:
        chosen = sorted(random.Random(config.seed + 2).sample(chosen, config.refine_max_examples))
    chosen_texts = sorted({int(text_of_example[i]) for i in chosen})
    states = ret_states(model, _Rows(prefixes, chosen_texts))
    state_cache = {tuple(distinct[j]): states[k] for k, j in enumerate(chosen_texts)}
    refined: dict[str, float] = {}
    staged_stop = bool(config.stop_at_step) and step >= config.stop_at_step < config.max_steps
    if config.refine_steps and not staged_stop:
        t0 = time.time()
        # Requests ("show me a red apple") join the captions here: their [RET] states come from
        # the final [RET], and the retrieval maps learn to place both forms on the image.
        # Dialogues whose answers determine the image join them for images with questions.
        form_texts, shares = retrieval_variants([split.examples[i] for i in chosen], tokenizer, config)
        fill_states(model, [t for f in form_texts for t in f], special, state_cache)
        row_of = {text: i for i, text in enumerate(state_cache)}
        width = max(len(f) for f in form_texts)
        table = torch.tensor(
            [
                [row_of[tuple(texts[i])]]
                + [row_of[tuple(f[j % len(f)] if f else texts[i])] for j in range(width)]
                for i, f in zip(chosen, form_texts, strict=True)
            ]
        )
        whole = len(chosen) == len(split)
        result = refine_retrieval(
            model,
            torch.stack(list(state_cache.values())),
            table,
            split.features if whole else split.features[:, torch.tensor(chosen)],
            group_ids if whole else group_ids[torch.tensor(chosen)],
            config.refine_steps,
            batch_size=config.refine_batch_size,
            lr=config.refine_lr,
            seed=config.seed,
            variant_share=torch.tensor(shares),
        )
        refined = {
            "refine/first_loss": result.first_loss,
            "refine/last_loss": result.last_loss,
            "refine/seconds": time.time() - t0,
        }
        log.info(
            "retrieval refinement: %d steps, loss %.3f -> %.3f",
            result.steps,
            result.first_loss,
            result.last_loss,
        )
        save_model(model, out_dir / "checkpoint", extra={"step": step, "train_config": to_dict(config)})
    final = _validate_all(
        model, val_splits, val_texts, special, tokenizer, config, True, state_cache, val_requests
    )
    summary = {
        **final,
        **refined,
        "step": step,
        "trainable_parameters": n_trainable,
        "peak_rss_mb": peak_rss_mb(),
        "samples_per_s": rate,
        "wall_minutes": (time.time() - start_time) / 60,
        "bad_inputs": bad.total,
        "nonfinite_steps_skipped": skipped_steps,
    }
    _log(metrics_file, writer, step, summary)
    metrics_file.close()
    if writer is not None:
        writer.close()
    atomic_write_bytes(
        out_dir / "summary.json",
        (json.dumps({**summary, "bad_input_kinds": dict(bad.counts)}, indent=2) + "\n").encode(),
    )
    return TrainResult(step, out_dir / "checkpoint", final, n_trainable, peak_rss_mb(), rate, bad.summary())


def _unsharded(model: FromageModel, config: TrainConfig, device: torch.device) -> FromageModel:
    """The trained model on a whole (unsharded) copy of the frozen LM, for the single-process
    refinement and validation after a sharded run."""
    # Building modules draws random initial weights; the draws after this must not move.
    with torch.random.fork_rng(devices=[]):
        lm, _ = load_lm(config.model.lm, device=device)
        whole = FromageModel(config.model, lm, model.encoder).to(device)
    whole.load_trained_state_dict(model.trained_state_dict())
    return whole.train()


def _validate_all(
    model,
    val_splits,
    val_texts,
    special,
    tokenizer,
    config: TrainConfig,
    captions: bool,
    states: dict,
    val_requests: dict | None = None,
) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, split in val_splits.items():
        if not len(split):
            continue
        metrics = validate(
            model,
            name,
            split,
            val_texts[name],
            special,
            tokenizer,
            config.data.heldout_concept_fraction,
            captions=captions,
            states=states,
            request_texts=(val_requests or {}).get(name),
        )
        out.update({f"val/{name}/{k}": v for k, v in metrics.items()})
    return out


def _log(file, writer, step: int, values: dict[str, Any]) -> None:
    file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
    file.flush()
    if writer is not None:
        for k, v in values.items():
            if isinstance(v, (int, float)):
                writer.add_scalar(k, v, step)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    try:
        return SummaryWriter(str(out_dir / "tensorboard"))
    except Exception:  # tensorboard missing or broken: metrics.jsonl still has everything
        return None


def _save(
    out_dir: Path,
    model,
    optimizer,
    caption_sampler,
    retrieval_sampler,
    generator,
    step: int,
    config: TrainConfig,
) -> None:
    save_model(model, out_dir / "checkpoint", extra={"step": step, "train_config": to_dict(config)})
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "generator": generator.get_state(),
        "python_rng": list(random.getstate()[1]),
        "numpy_rng": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "samplers": [caption_sampler.state(), retrieval_sampler.state()],
        # The model's trained tensors are in the checkpoint; kept here too so the state is whole.
        "model": model.trained_state_dict(),
    }
    state_dir = out_dir / "train_state"
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".state.pt.{os.getpid()}"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, state_dir / "state.pt")


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Half-written files a killed run left behind (writes go to a hidden temporary name and
    are renamed when complete, so these never hold anything the run needs)."""
    for folder in (out_dir / "checkpoint", out_dir / "train_state"):
        for stale in folder.glob(".*"):
            if stale.is_file() and stale.name.startswith(
                (".model.safetensors.", ".config.json.", ".state.pt.")
            ):
                log.info("removing %s, left by an interrupted write", stale)
                stale.unlink()


def _load_state(state_dir: Path, model, optimizer, caption_sampler, retrieval_sampler, generator) -> int:
    state = torch.load(state_dir / "state.pt", map_location="cpu", weights_only=True)
    model.load_trained_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    generator.set_state(state["generator"])
    random.setstate((3, tuple(state["python_rng"]), None))
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], state["numpy_rng"].numpy().astype(np.uint32), 624, 0, 0.0))
    caption_sampler.load(state["samplers"][0])
    retrieval_sampler.load(state["samplers"][1])
    return int(state["step"])
