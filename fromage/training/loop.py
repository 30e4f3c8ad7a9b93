"""The training loop (DESIGN §3), top to bottom.

`train(config)` sets a run up (processes, backbones, cached image features, tokenised texts,
frozen retrieval-pass prefixes, optimiser and resumable state), runs the joint loop (each step
the captioning pass and the retrieval pass of step.py; only the three maps, `[RET]` and the
temperature are in the optimiser), then refines the retrieval maps on cached `[RET]` states
(refine.py), validates, and writes a summary.

Writes `output_dir/checkpoint/` (config.json + model.safetensors: trained tensors only),
`output_dir/train_state/` (state.py), `output_dir/metrics.jsonl` and `output_dir/summary.json`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backbones import load_encoder, load_lm
from ..backbones.vision import FrozenImageEncoder
from ..checkpoint import load_config, load_trained_tensors, save_model
from ..config import TrainConfig, save_json, to_dict
from ..data.dataset import Split, build_examples, extract_features
from ..data.readers import BadInputLog
from ..fileio import atomic_write_bytes
from ..model import FromageModel
from ..tokens import SpecialTokens
from .distributed import Processes, init_processes
from .metrics_log import MetricsLog
from .prefixes import build_prefixes
from .refine import refine_after_loop
from .state import EpochSampler, RunState, has_state, remove_stale_temporaries
from .step import StepData, StepInput, lr_at, pick_caption_texts, train_step, use_bf16
from .tasks import TaskSampler
from .texts import TrainTexts, tokenize_families
from .validate import validate_all

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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(config: TrainConfig) -> TrainResult:
    start_time = time.time()
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    # Every process runs the same code on the same seeds and the whole global batch's random
    # draws; only the forward/backward work is split (step.py). The main process alone writes
    # files, validates and refines.
    procs = init_processes(config.device)
    if not procs.is_main:
        logging.getLogger("fromage").setLevel(logging.WARNING)
    bf16 = use_bf16(config, procs.device)
    if bf16:
        config.model.lm.dtype = "bfloat16"

    run = _prepare(config, procs, out_dir)
    metrics = MetricsLog(out_dir) if procs.is_main else None
    samples_per_s, skipped = _loop(
        run.model,
        run.data,
        run.texts,
        run.sampler,
        run.state,
        config,
        procs,
        bf16,
        start_time,
        metrics,
        lambda final, states: _validate(run, config, final, states),
    )
    # The resumable state is the joint loop's; refinement below only rewrites the checkpoint.
    if procs.is_main:
        run.state.save(out_dir, run.model, config)
    procs.barrier()
    sharded = config.shard_lm and procs.distributed
    procs.close()  # what follows runs in the main process alone
    if metrics is None:
        return TrainResult(
            run.state.step,
            out_dir / "checkpoint",
            {},
            run.n_trainable,
            peak_rss_mb(),
            samples_per_s,
            run.bad.summary(),
            False,
        )
    if sharded:
        run.model = _unsharded(run.model, config, procs.device)
    return _finish(run, config, metrics, samples_per_s, skipped, start_time)


@dataclass
class _Run:
    """What a run sets up before its first step."""

    model: FromageModel
    tokenizer: Any
    special: SpecialTokens
    val_splits: dict[str, Split]
    bad: BadInputLog
    texts: TrainTexts
    data: StepData
    sampler: TaskSampler | None
    state: RunState
    n_trainable: int
    sharded_blocks: int


def _prepare(config: TrainConfig, procs: Processes, out_dir: Path) -> _Run:
    """Backbones, cached features, tokenised texts, the model, the frozen prefixes, the task
    sampler, the optimiser, and the saved state when the run resumes."""
    device = procs.device
    lm, tokenizer = load_lm(config.model.lm, device=device)
    encoder = load_encoder(config.model.encoder, device=device)
    # The checkpoint names the weights the maps were trained on; loading refuses others.
    config.model.lm.revision = config.model.lm.revision or lm.revision
    config.model.encoder.revision = config.model.encoder.revision or encoder.revision
    special = SpecialTokens.from_tokenizer(tokenizer)
    split, val_splits, bad = _features(config, encoder, procs)
    texts = tokenize_families(tokenizer, split, val_splits, config)

    model = FromageModel(config.model, lm, encoder).to(device)
    sharded_blocks = lm.shard_layers() if config.shard_lm and procs.distributed else 0
    if sharded_blocks:
        log.info("frozen LM: %d decoder blocks sharded over %d processes", sharded_blocks, procs.world_size)
    model.set_feature_stats(split.features[0])
    prefixes = build_prefixes(model, texts.distinct, special, config)
    if config.init_from and not (config.resume and has_state(out_dir)):
        # After the prefixes: they set the `[RET]`-state statistics, which the checkpoint's maps
        # were trained against and which it therefore replaces.
        start_from(model, config)
    data = StepData(split, prefixes, texts.text_of_example, texts.group_ids, special, _token_cache(tokenizer))
    sampler = TaskSampler(split.examples, config.tasks) if config.tasks.batch_size else None

    params = model.trainable_parameters()
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    state = RunState(
        optimizer,
        EpochSampler(len(split), config.seed),
        EpochSampler(len(split), config.seed + 1),
        torch.Generator().manual_seed(config.seed),
    )
    if procs.is_main:
        remove_stale_temporaries(out_dir)
    procs.barrier()
    if config.resume and state.load(out_dir, model):
        log.info("resumed from step %d", state.step)
    if procs.is_main:
        save_json(config, out_dir / "train_config.json")
    log.info(
        "trainable parameters: %d (%.2f M); %d process(es)", n_trainable, n_trainable / 1e6, procs.world_size
    )
    return _Run(
        model, tokenizer, special, val_splits, bad, texts, data, sampler, state, n_trainable, sharded_blocks
    )


TENSOR_KEYS = (
    "lm.name",
    "lm.revision",
    "encoder.name",
    "encoder.revision",
    "encoder.image_size",
    "num_visual_tokens",
    "retrieval_dim",
    "ret_layer",
    "feature_dim",
    "hidden_size",
    "vocab_size",
)
"""ModelConfig fields (flattened) that a checkpoint's trained tensors depend on."""


def start_from(model: FromageModel, config: TrainConfig) -> None:
    """Load `config.init_from`'s trained tensors into `model`, refusing a checkpoint of another
    model config (the maps would not fit, or would silently mean something else)."""
    theirs, ours = _flat(to_dict(load_config(config.init_from))), _flat(to_dict(model.config))
    # What decides the tensors' shapes and meaning; training-only settings (dropout, activation
    # checkpointing, the temperature's start, the LM's dtype) may change between stages.
    differ = sorted(k for k in TENSOR_KEYS if theirs.get(k) != ours.get(k))
    if differ:
        raise ValueError(
            f"init_from {config.init_from}: its model config differs from this run's in {differ}"
        )
    model.load_trained_state_dict(load_trained_tensors(config.init_from))
    log.info("trained tensors from %s", config.init_from)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"lm": {"name": …}} → {"lm.name": …}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _validate(run: _Run, config: TrainConfig, final: bool, states: dict) -> dict[str, float]:
    return validate_all(
        run.model,
        run.val_splits,
        run.texts.val_captions,
        run.special,
        run.tokenizer,
        config.data.heldout_concept_fraction,
        captions=final,
        states=states,
        val_requests=run.texts.val_requests if final else None,
    )


def _finish(
    run: _Run,
    config: TrainConfig,
    metrics: MetricsLog,
    samples_per_s: float,
    skipped: int,
    start_time: float,
) -> TrainResult:
    """Refinement (unless the run stopped early on purpose), the final validation, and the
    summary (metrics.jsonl, summary.json)."""
    out_dir, step = Path(config.output_dir), run.state.step
    staged_stop = bool(config.stop_at_step) and step >= config.stop_at_step < config.max_steps
    refined, states = refine_after_loop(
        run.model, run.data, run.texts, run.tokenizer, config, run_refinement=not staged_stop
    )
    if refined:
        save_model(run.model, out_dir / "checkpoint", extra={"step": step, "train_config": to_dict(config)})
    final = _validate(run, config, True, states)
    summary = {
        **final,
        **refined,
        "step": step,
        "trainable_parameters": run.n_trainable,
        "peak_rss_mb": peak_rss_mb(),
        "samples_per_s": samples_per_s,
        "wall_minutes": (time.time() - start_time) / 60,
        "bad_inputs": run.bad.total,
        "nonfinite_steps_skipped": skipped,
        "sharded_lm_blocks": run.sharded_blocks,
    }
    metrics.log(step, summary)
    metrics.close()
    payload = {**summary, "bad_input_kinds": dict(run.bad.counts)}
    atomic_write_bytes(out_dir / "summary.json", (json.dumps(payload, indent=2) + "\n").encode())
    return TrainResult(
        step, out_dir / "checkpoint", final, run.n_trainable, peak_rss_mb(), samples_per_s, run.bad.summary()
    )


def _features(
    config: TrainConfig, encoder: FrozenImageEncoder, procs: Processes
) -> tuple[Split, dict[str, Split], BadInputLog]:
    """Training and validation examples with their cached image features (the frozen encoder
    runs once per image and view). The main process fills the cache; the others then read it."""
    bad = BadInputLog()
    train_examples, val_examples = build_examples(config.data, bad)
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
    return split, val_splits, bad


def _loop(
    model: FromageModel,
    data: StepData,
    texts: TrainTexts,
    sampler: TaskSampler | None,
    run: RunState,
    config: TrainConfig,
    procs: Processes,
    bf16: bool,
    start_time: float,
    metrics: MetricsLog | None,
    validate_now: Callable[[bool, dict], dict[str, float]],
) -> tuple[float, int]:
    """The joint loop until `max_steps`, `stop_at_step` or the time budget.
    → (samples per second, updates skipped for a non-finite loss or gradient)."""
    out_dir = Path(config.output_dir)
    params = model.trainable_parameters()
    bar = tqdm(
        total=None if config.max_minutes else config.max_steps,
        initial=run.step,
        desc="train",
        unit="step",
        disable=not procs.is_main,
    )
    samples = skipped = streak = 0
    loop_start = time.time()
    model.train()
    # With a time budget, the final validation needs time too: it is held back from training.
    budget_s = 0.0
    if config.max_minutes:
        budget_s = (
            config.max_minutes * 60 - config.final_eval_reserve_minutes * 60 - (loop_start - start_time)
        )
        budget_s = max(budget_s, 1.0)
    time_progress = 0.0
    while run.step < config.max_steps:
        if config.stop_at_step and run.step >= config.stop_at_step:
            break
        if budget_s:
            # The main process's clock decides for all, so every process stops at the same step.
            mine = (time.time() - loop_start) / max(budget_s, 1e-9) if procs.is_main else 0.0
            time_progress = float(procs.sum(torch.tensor([mine], dtype=torch.float64)))
            if time_progress >= 1.0:
                log.info("time budget of %.1f min reached at step %d", config.max_minutes, run.step)
                break
        for group in run.optimizer.param_groups:
            group["lr"] = lr_at(run.step, config, time_progress)
        parts = _accumulate(model, data, texts, sampler, run, config, procs, bf16)
        procs.sum_gradients(params)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
        if not (math.isfinite(grad_norm) and all(math.isfinite(p["loss"]) for p in parts)):
            # A NaN/inf loss or gradient: the update is dropped, counted, and the run stops
            # once too many come in a row (the saved checkpoints stay finite).
            run.optimizer.zero_grad(set_to_none=True)
            skipped, streak = skipped + 1, streak + 1
            _check_streak(streak, [p["loss"] for p in parts], grad_norm, run.step, config)
            continue
        streak = 0
        run.optimizer.step()
        if config.model.ret_norm_rescale:
            model.rescale_ret_embedding()
        run.step += 1
        samples += config.batch_size * config.grad_accum_steps
        last = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
        last.update(grad_norm=grad_norm, lr=run.optimizer.param_groups[0]["lr"])
        rate = samples / max(time.time() - loop_start, 1e-9)
        bar.set_postfix(loss=f"{last['loss']:.3f}", samples_s=f"{rate:.1f}")
        bar.update(1)
        if metrics is None:
            continue  # the other processes only train
        step, before_end = run.step, run.step < config.max_steps
        if step % config.log_every == 0 or step == config.max_steps:
            metrics.log(step, {**last, "samples_per_s": rate})
        if config.eval_every and step % config.eval_every == 0 and before_end:
            metrics.log(step, validate_now(False, {}))
        if config.save_every and step % config.save_every == 0 and before_end:
            run.save(out_dir, model, config)
    bar.close()
    return samples / max(time.time() - loop_start, 1e-9), skipped


def _accumulate(
    model: FromageModel,
    data: StepData,
    texts: TrainTexts,
    sampler: TaskSampler | None,
    run: RunState,
    config: TrainConfig,
    procs: Processes,
    bf16: bool,
) -> list[dict[str, float]]:
    """Gradients of one optimiser step: `grad_accum_steps` micro-batches, each scaled."""
    interleave = bool(torch.rand((), generator=run.generator) < config.interleave_prob)
    run.optimizer.zero_grad(set_to_none=True)
    parts = []
    for micro in range(config.grad_accum_steps):
        with torch.autocast(procs.device.type, dtype=torch.bfloat16, enabled=bf16):
            caption_idx = run.caption_sampler.take(config.batch_size)
            caption_texts, caption_context = pick_caption_texts(
                texts.captions,
                texts.qa_forms,
                caption_idx,
                config.data.qa_caption_share,
                run.generator,
                texts.qa_context,
            )
            batch = StepInput(
                caption_idx,
                caption_texts,
                run.retrieval_sampler.take(config.retrieval_batch_size),
                interleave,
                caption_context=caption_context,
            )
            if sampler is not None:
                # Drawn from (seed, step, micro-batch) alone: a resumed run draws the same contexts.
                rng = random.Random(f"{config.seed}/{run.step}/{micro}")
                batch.contexts = sampler.draw(config.tasks.batch_size, rng)
            scale = 1.0 / config.grad_accum_steps
            parts.append(train_step(model, data, batch, config, run.generator, procs.device, scale, procs))
    return parts


def _token_cache(tokenizer: Any) -> Callable[[str], list[int]]:
    """Text → ids without special tokens, memoised (contexts repeat their pieces)."""
    cache: dict[str, list[int]] = {}

    def tokenize(text: str) -> list[int]:
        if text not in cache:
            cache[text] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return cache[text]

    return tokenize


def _check_streak(streak: int, losses: list[float], grad_norm: float, step: int, config: TrainConfig) -> None:
    log.warning(
        "step %d: non-finite loss %s or gradient norm %s; update skipped (%d in a row)",
        step,
        losses,
        grad_norm,
        streak,
    )
    if streak >= config.max_nonfinite_steps:
        raise FloatingPointError(
            f"{streak} steps in a row had a non-finite loss or gradient (limit "
            f"max_nonfinite_steps={config.max_nonfinite_steps}); stopped at step {step}. "
            f"The last checkpoint in {config.output_dir} holds finite weights; try a lower lr "
            f"(now {config.lr}) or precision fp32."
        )


def _unsharded(model: FromageModel, config: TrainConfig, device: torch.device) -> FromageModel:
    """The trained model on a whole (unsharded) copy of the frozen LM, for the single-process
    refinement and validation after a sharded run."""
    # Building modules draws random initial weights; the draws after this must not move.
    with torch.random.fork_rng(devices=[]):
        lm, _ = load_lm(config.model.lm, device=device)
        whole = FromageModel(config.model, lm, model.encoder).to(device)
    whole.load_trained_state_dict(model.trained_state_dict())
    return whole.train()
