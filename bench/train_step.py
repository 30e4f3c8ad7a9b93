"""Training step: this project's vs a faithful re-creation of the published algorithm (issue #6).

    .venv/bin/python bench/train_step.py [--batch 64] [--retrieval-batch 64] [--steps 4] [--warmup 1]
        [--rounds 2] [--examples 512] [--json PATH] [--tiny] [--in-process]

Same model (the embedded default LM + encoder, the same seeded maps), same data (emoji and
easy-VQA images with their captions), the same step schedule (which images each step reads,
which steps pack two captions per row), the same AdamW settings and precision. Each contender
runs in its own subprocess so that its peak RSS is its own; the subprocesses alternate for
`--rounds` rounds (the machine is noisy) and the ratios are printed at the end.

- **ours**: `fromage.training.step.train_step` as the loop runs it. Image features are encoded once and
  the frozen `[BOS] caption` prefixes of the retrieval pass precomputed once: both one-time costs
  are timed and reported on their own, not hidden in the per-step rate.
- **published** (kohjingyu/fromage `main.py` + `fromage/models.py`, re-created here as a
  baseline): the LM's (tied) embedding matrix is resized by one row for `[RET]` and made
  trainable whole; after the single backward every row's gradient but `[RET]`'s is zeroed, so
  gradients and AdamW state are V x d; the frozen image encoder runs on every step, once per pass
  (captioning and retrieval modes each call it), without autograd; the retrieval pass is a full LM
  forward over `[BOS] caption [RET]` with labels, autograd through every position; caption CE +
  retrieval CE + contrastive are summed and backpropagated once; then the `[RET]` row is rescaled
  to the frozen rows' mean norm. Decoding/resizing the images (the published DataLoader's work,
  done in worker processes there) is timed separately and excluded from its step time.

Both contenders read the same token layouts (`caption_batch`) and treat every pair as a distinct
negative (the published contrastive loss has no groups), so at step 0 their losses agree: a check
that the re-creation computes the same thing (`tests/test_bench_scripts.py`).
`--tiny` swaps in tiny random backbones built from configs (the test's configuration).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fromage.backbones import FrozenImageEncoder, FrozenLM, load_encoder, load_lm  # noqa: E402
from fromage.backbones.lm import _find_final_norm  # noqa: E402
from fromage.config import TrainConfig, embedded_recipe_model  # noqa: E402
from fromage.data.builtin import easyvqa_examples, emoji_examples  # noqa: E402
from fromage.data.collate import caption_batch  # noqa: E402
from fromage.data.dataset import extract_features  # noqa: E402
from fromage.data.examples import Example  # noqa: E402
from fromage.data.feature_cache import FeatureCache  # noqa: E402
from fromage.data.images import load_image  # noqa: E402
from fromage.data.readers import BadInputLog  # noqa: E402
from fromage.model import FromageModel  # noqa: E402
from fromage.tokens import IGNORE_INDEX, IMAGE_TOKEN_ID, SpecialTokens, tokenize_captions  # noqa: E402
from fromage.training.prefixes import precompute_prefixes  # noqa: E402
from fromage.training.step import StepData, StepInput, train_step  # noqa: E402

CONTENDERS = ("ours", "ours-ckpt", "published")
"""`ours-ckpt`: ours with `ModelConfig.activation_checkpointing` on (off in `ours`)."""


# ------------------------------------------------------------------------------------ memory


def rss_mb() -> float:
    """Current resident set size (MiB)."""
    return _status_kb("VmRSS") / 1024


def hwm_mb() -> float:
    """Peak RSS since the last `reset_hwm` (MiB)."""
    return _status_kb("VmHWM") / 1024


def reset_hwm() -> bool:
    """Restart the kernel's peak-RSS counter (Linux >= 4.0), so a phase's own peak can be read."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kb(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    found = re.search(rf"{field_name}:\s+(\d+) kB", text)
    return int(found.group(1)) if found else 0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------ setup


@dataclass
class Setup:
    lm: FrozenLM
    encoder: FrozenImageEncoder
    special: SpecialTokens
    config: TrainConfig
    texts: list[list[int]]
    """Caption token ids per example."""
    examples: list[Example]
    image_paths: list[str]
    schedule: list[tuple[list[int], list[int], bool]]
    """Per step: captioning-pass examples, retrieval-pass examples, interleave."""
    warmup: int
    """Untimed steps at the start of `schedule`."""
    loaded_rss_mb: float
    seconds: dict[str, float] = field(default_factory=dict)


def tiny_backbones(vocab: int) -> tuple[FrozenLM, FrozenImageEncoder]:
    """Random tiny Llama (tied head, the real tokenizer's vocabulary) + tiny CLIP vision tower."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from fromage.backbones import build_hf_vision

    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            max_position_embeddings=128,
        )
    )
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    )
    return FrozenLM(lm), build_hf_vision(vision, "tiny-clip", 32)


def make_setup(args: argparse.Namespace) -> Setup:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    config = TrainConfig()
    config.model = embedded_recipe_model()
    # Dropout would draw different masks in the two processes; the step costs the same without.
    config.model.feature_dropout = 0.0
    config.batch_size, config.retrieval_batch_size = args.batch, args.retrieval_batch
    if args.tiny:
        from fromage.backbones import load_tokenizer

        tokenizer = load_tokenizer(config.model.lm)
        lm, encoder = tiny_backbones(len(tokenizer))
        config.model.ret_layer = -1
    else:
        lm, tokenizer = load_lm(config.model.lm)
        encoder = load_encoder(config.model.encoder)
    special = SpecialTokens.from_tokenizer(tokenizer)
    # Page every weight in (safetensors are memory-mapped), so the loaded baseline is whole.
    with torch.no_grad():
        for p in [*lm.parameters(), *encoder.parameters()]:
            p.sum()
    load_s = time.perf_counter() - t0

    examples = emoji_examples("google", "train") + easyvqa_examples("train", 20)
    random.Random(args.seed).shuffle(examples)
    examples = examples[: args.examples]
    texts = tokenize_captions(tokenizer, [e.caption for e in examples], config.data.max_caption_tokens)
    rng = random.Random(args.seed + 1)
    n = len(examples)
    schedule = [
        (
            rng.sample(range(n), min(args.batch, n)),
            rng.sample(range(n), min(args.retrieval_batch, n)),
            rng.random() < config.interleave_prob,
        )
        for _ in range(args.warmup + args.steps)
    ]
    paths = [e.image for e in examples]
    setup = Setup(lm, encoder, special, config, texts, examples, paths, schedule, args.warmup, rss_mb())
    setup.seconds["load_backbones"] = load_s
    return setup


def build_model(setup: Setup) -> FromageModel:
    """The maps with the same seeded initialisation in every process."""
    torch.manual_seed(1234)
    return FromageModel(setup.config.model, setup.lm, setup.encoder).train()


# ------------------------------------------------------------------------------------ ours


def feature_cache(setup: Setup, args: argparse.Namespace) -> FeatureCache:
    return FeatureCache(args.feature_dir, setup.encoder.encoder_id)


def run_features(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Ours, step 0 (`fromage features`): encode every image once into the feature cache."""
    t0 = time.perf_counter()
    split = extract_features(setup.examples, setup.encoder, BadInputLog(), cache=feature_cache(setup, args))
    seconds = time.perf_counter() - t0
    return {
        "images": len(split),
        "seconds": seconds,
        "images_per_s": len(split) / max(seconds, 1e-9),
        "loaded_rss_mb": setup.loaded_rss_mb,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_ours(setup: Setup, args: argparse.Namespace, checkpointing: bool) -> dict[str, Any]:
    config, special = setup.config, setup.special
    config.model.activation_checkpointing = checkpointing
    config.model.activation_checkpointing_share = args.checkpoint_share
    model = build_model(setup)
    # One-time costs, timed on their own. Features: the `features` worker (its own process, as
    # `fromage features` is its own step) filled the cache; the loop reads it, as training/loop.py does.
    t0 = time.perf_counter()
    split = extract_features(setup.examples, setup.encoder, BadInputLog(), cache=feature_cache(setup, args))
    read_s = time.perf_counter() - t0
    if len(split) != len(setup.examples):
        raise RuntimeError(f"{len(setup.examples) - len(split)} of {len(setup.examples)} images unreadable")
    # The frozen prefix of every distinct caption, once (training/prefixes.py does this before the first step).
    t0 = time.perf_counter()
    text_index: dict[tuple[int, ...], int] = {}
    text_of_example = torch.tensor([text_index.setdefault(tuple(t), len(text_index)) for t in setup.texts])
    prefixes = precompute_prefixes(model, [list(t) for t in text_index], special)
    prefix_s = time.perf_counter() - t0
    prefix_mb = (
        sum(
            t.numel() * t.element_size()
            for t in (prefixes.last_hidden, prefixes.keys, prefixes.values, prefixes.frozen_lse)
        )
        / 2**20
    )
    # Every pair is its own negative, as in the published contrastive loss.
    group_ids = torch.arange(len(setup.texts))
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(0)
    device = torch.device("cpu")
    data = StepData(split, prefixes, text_of_example, group_ids, special)

    def step(cap_idx: list[int], ret_idx: list[int], interleave: bool) -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        batch = StepInput(cap_idx, [setup.texts[i] for i in cap_idx], ret_idx, interleave)
        out = train_step(model, data, batch, config, generator, device)
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        model.rescale_ret_embedding()
        return out

    result = _timed_steps(setup, step)
    result["one_time"] = {
        "read_cached_features_s": read_s,
        "images": len(setup.image_paths),
        "precompute_prefixes_s": prefix_s,
        "distinct_texts": len(text_index),
        "prefix_table_mb": prefix_mb,
    }
    result["trainable_parameters"] = sum(p.numel() for p in params)
    return result


# ------------------------------------------------------------------------------------ published


class PublishedStep:
    """The published training step on our backbones and maps (see the module docstring)."""

    def __init__(self, model: FromageModel, setup: Setup):
        self.model, self.setup = model, setup
        self.hf = model.lm.model
        vocab = model.lm.vocab_size
        self.ret_id = vocab
        # models.py: `self.lm.resize_token_embeddings(len(tokenizer))` after adding [RET]; the new
        # nn.Embedding requires grad, and a tied head shares it.
        self.hf.resize_token_embeddings(vocab + 1, mean_resizing=False)
        self.embedding: torch.Tensor = self.hf.get_input_embeddings().weight
        head: torch.Tensor = self.hf.get_output_embeddings().weight
        with torch.no_grad():  # [RET] starts where ours does, so step-0 losses can be compared
            self.embedding[vocab].copy_(model.ret_embedding.detach().to(self.embedding.dtype))
            if head.data_ptr() != self.embedding.data_ptr():
                head[vocab].copy_(model.ret_output_row.detach().to(head.dtype))
        self.embedding.requires_grad_(True)
        self.matrices = [self.embedding]
        if head.data_ptr() != self.embedding.data_ptr():  # untied LM: its head row too
            head.requires_grad_(True)
            self.matrices.append(head)
        self.params = [
            *self.matrices,
            *model.visual_map.parameters(),
            *model.text_ret_map.parameters(),
            *model.image_ret_map.parameters(),
            model.logit_scale,
        ]
        config = setup.config
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
        self.final_norm = _find_final_norm(model.lm.base)
        self.data_s = 0.0

    def pixels(self, idx: list[int]) -> torch.Tensor:
        """The DataLoader's work (decode + resize + normalise); excluded from the step time."""
        t0 = time.perf_counter()
        encoder = self.setup.encoder
        out = encoder.preprocess([load_image(self.setup.image_paths[i]) for i in idx])
        self.data_s += time.perf_counter() - t0
        return out.to(next(encoder.parameters()).dtype)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        # The published vision model is frozen (requires_grad False) and its input needs no
        # gradient, so autograd records nothing there: the same as no_grad, used here.
        with torch.no_grad():
            return self.setup.encoder(pixels).float()

    def __call__(self, cap_idx: list[int], ret_idx: list[int], interleave: bool) -> dict[str, float]:
        model, setup, special = self.model, self.setup, self.setup.special
        config = setup.config
        cap_pixels, ret_pixels = self.pixels(cap_idx), self.pixels(ret_idx)
        t_start_data = self.data_s

        # Captioning mode: the encoder runs, visual tokens replace the image slots, full LM with labels.
        batch = caption_batch(
            [setup.texts[i] for i in cap_idx], model.config.num_visual_tokens, special, interleave
        )
        visual = model.visual_tokens(self.encode(cap_pixels)[batch.image_order])  # (n, k, d)
        ids = batch.input_ids
        embeds = F.embedding(ids.clamp(min=0), self.embedding)  # (B, T, d)
        slots = (ids == IMAGE_TOKEN_ID).nonzero(as_tuple=True)
        embeds[slots] = visual.reshape(-1, visual.shape[-1]).to(embeds.dtype)
        # As published: right padding, no attention mask (causal: padding after a row's end never
        # reaches its real tokens), padding labelled -100.
        loss_cap = self.hf(inputs_embeds=embeds, labels=batch.labels, output_hidden_states=True).loss

        # Retrieval mode: `[BOS] caption [RET]`, full forward + backward through every position.
        rows = [[special.bos, *setup.texts[i], self.ret_id] for i in ret_idx]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), special.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
            labels[r, : len(row)] = torch.tensor(row)
        out = self.hf(
            inputs_embeds=F.embedding(ids, self.embedding), labels=labels, output_hidden_states=True
        )
        layer = model.config.ret_layer
        hidden = out.hidden_states[-1]  # last layer, already through the final norm
        if layer not in (-1, model.lm.num_layers):
            assert self.final_norm is not None
            hidden = self.final_norm(out.hidden_states[layer])
        last = torch.tensor([len(r) - 1 for r in rows])  # the [RET] position
        text = model.text_embeddings(hidden[torch.arange(len(rows)), last])  # (B, R) unit
        image = model.image_embeddings(self.encode(ret_pixels))  # (B, R) unit
        logits_per_image = (model.logit_scale.exp() * image) @ text.T
        target = torch.arange(len(rows))
        loss_con = (
            F.cross_entropy(logits_per_image.T, target) + F.cross_entropy(logits_per_image, target)
        ) / 2
        loss_ret = out.loss
        total = (
            config.caption_loss_weight * loss_cap
            + config.retrieval_lm_loss_weight * loss_ret
            + config.contrastive_loss_weight * loss_con
        )
        total.backward()
        # main.py: zero the gradient of every embedding row but [RET], then clip, step, rescale.
        for matrix in self.matrices:
            assert matrix.grad is not None
            keep = torch.arange(matrix.grad.shape[0]) != self.ret_id
            matrix.grad[keep, :] = 0
        torch.nn.utils.clip_grad_norm_(self.params, config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():
            frozen_norm = self.embedding[:-1].norm(dim=1).mean(0)
            row = self.embedding[-1]
            row.div_(row.norm() / frozen_norm)
        assert self.data_s == t_start_data  # no data work inside the timed part
        return {
            "loss": float(total.detach()),
            "caption_loss": float(loss_cap.detach()),
            "ret_lm_loss": float(loss_ret.detach()),
            "contrastive_loss": float(loss_con.detach()),
        }


def run_published(setup: Setup) -> dict[str, Any]:
    model = build_model(setup)
    step = PublishedStep(model, setup)
    result = _timed_steps(setup, step, lambda: step.data_s)
    result["one_time"] = {}
    result["excluded_data_loading_s"] = step.data_s
    result["trainable_parameters"] = sum(p.numel() for p in step.params)
    return result


# ------------------------------------------------------------------------------------ timing


def _timed_steps(setup: Setup, step, excluded=lambda: 0.0) -> dict[str, Any]:
    """Warm-up steps, then the timed ones; the training phase's own peak RSS is read too."""
    before_steps_mb = rss_mb()
    phase_peak_ok = reset_hwm()
    first: dict[str, float] = {}
    losses = []
    timed_s = cpu_s = 0.0
    for i, (cap_idx, ret_idx, interleave) in enumerate(setup.schedule):
        skip0 = excluded()
        t0, c0 = time.perf_counter(), time.process_time()
        out = step(cap_idx, ret_idx, interleave)
        # Data loading (published) is excluded from both clocks; its CPU share is about its wall share.
        skipped = excluded() - skip0
        elapsed = time.perf_counter() - t0 - skipped
        cpu = time.process_time() - c0 - skipped
        if i == 0:
            first = out
        losses.append(out["loss"])
        if i >= setup.warmup:
            timed_s += elapsed
            cpu_s += cpu
    steps = len(setup.schedule) - setup.warmup
    return {
        "samples_per_s": steps * setup.config.batch_size / max(timed_s, 1e-9),
        "seconds_per_step": timed_s / max(steps, 1),
        # Other jobs on a shared machine stretch wall time; CPU time (all threads) much less.
        "samples_per_cpu_s": steps * setup.config.batch_size / max(cpu_s, 1e-9),
        "first_step": first,
        "losses": losses,
        "loaded_rss_mb": setup.loaded_rss_mb,
        "rss_before_steps_mb": before_steps_mb,
        "train_phase_peak_rss_mb": hwm_mb() if phase_peak_ok else None,
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "load_backbones_s": setup.seconds["load_backbones"],
    }


def run_worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    setup = make_setup(args)
    if name == "features":
        return run_features(setup, args)
    result = run_published(setup) if name == "published" else run_ours(setup, args, name == "ours-ckpt")
    result["contender"] = name
    return result


# ------------------------------------------------------------------------------------ driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="captioning-pass batch (samples per step)")
    parser.add_argument("--retrieval-batch", type=int, default=64, help="retrieval-pass batch")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="subprocess pairs, alternating order")
    parser.add_argument("--examples", type=int, default=512, help="training examples (one-time costs)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint-share", type=float, default=1.0, help="ours-ckpt: share of decoder blocks recomputed"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny random backbones (tests)")
    parser.add_argument(
        "--in-process", action="store_true", help="no subprocesses (tests; peak RSS then not per contender)"
    )
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset")
    parser.add_argument("--json", default="", help="write all results here")
    parser.add_argument("--worker", choices=[*CONTENDERS, "features"], default="", help=argparse.SUPPRESS)
    parser.add_argument("--feature-dir", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        # On a line of its own: libraries may have left a partial line on stdout (ONNX export).
        print("\nRESULT " + json.dumps(run_worker(args.worker, args)), flush=True)
        return {}
    names = [n for n in args.contenders.split(",") if n]
    unknown = sorted(set(names) - set(CONTENDERS)) or (
        [] if "published" in names else ["(published missing)"]
    )
    if unknown:
        raise SystemExit(f"--contenders takes {', '.join(CONTENDERS)} (published included); got {unknown}")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="fromage-train-bench-") as tmp:
        args.feature_dir = args.feature_dir or tmp
        features = _run_one("features", args)
        print(f"features (one-time, own process): {features['images_per_s']:.1f} images/s", flush=True)
        _rounds(args, names, runs)
    summary = summarise(runs, args)
    summary["one_time_features"] = features
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")
    return summary


def _rounds(args: argparse.Namespace, names: list[str], runs: dict[str, list[dict[str, Any]]]) -> None:
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            runs[name].append(_run_one(name, args))
            print(f"round {r + 1} {name}: {runs[name][-1]['samples_per_s']:.2f} samples/s", flush=True)


def _run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    if args.in_process:
        return run_worker(name, args)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *_argv_from(args), "--worker", name],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _argv_from(args: argparse.Namespace) -> list[str]:
    out = [
        f"--batch={args.batch}",
        f"--retrieval-batch={args.retrieval_batch}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--examples={args.examples}",
        f"--threads={args.threads}",
        f"--seed={args.seed}",
        f"--checkpoint-share={args.checkpoint_share}",
        f"--feature-dir={args.feature_dir}",
    ]
    return out + (["--tiny"] if args.tiny else [])


def summarise(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    """Mean samples/s over rounds, the highest peak RSS, and each `ours*` against `published`."""
    names = list(runs)

    def mean(name: str, key: str) -> float:
        return sum(r[key] for r in runs[name]) / len(runs[name])

    rate = {n: mean(n, "samples_per_s") for n in names}
    cpu_rate = {n: mean(n, "samples_per_cpu_s") for n in names}
    peak = {n: max(r["peak_rss_mb"] for r in runs[n]) for n in names}
    step_peak = {n: max(r["train_phase_peak_rss_mb"] or 0.0 for r in runs[n]) for n in names}
    loaded = {n: mean(n, "loaded_rss_mb") for n in names}
    growth = {n: peak[n] - loaded[n] for n in names}
    pub = "published"
    ours = [n for n in names if n != pub]
    summary: dict[str, Any] = {
        "batch": args.batch,
        "retrieval_batch": args.retrieval_batch,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "threads": args.threads,
        "examples": args.examples,
        "samples_per_s": rate,
        "samples_per_cpu_s": cpu_rate,
        "peak_rss_mb": peak,
        "train_phase_peak_rss_mb": step_peak,
        "loaded_rss_mb": loaded,
        "rss_growth_mb": growth,
        "ratios": {
            n: {
                "samples_per_s": rate[n] / rate[pub],
                "samples_per_cpu_s": cpu_rate[n] / cpu_rate[pub],
                "peak_rss": peak[n] / peak[pub],
                "train_phase_peak_rss": step_peak[n] / max(step_peak[pub], 1e-9),
                "rss_growth": growth[n] / max(growth[pub], 1e-9),
            }
            for n in ours
        },
        "first_step_loss": {n: runs[n][0]["first_step"] for n in names},
        "one_time": {n: runs[n][0]["one_time"] for n in ours},
        "published_excluded_data_loading_s": mean(pub, "excluded_data_loading_s"),
        "trainable_parameters": {n: runs[n][0]["trainable_parameters"] for n in names},
    }
    print(
        f"batch {args.batch} captions + {args.retrieval_batch} retrieval texts, {args.steps} timed steps "
        f"after {args.warmup} warm-up, {args.rounds} rounds, {args.threads} threads, {args.examples} examples"
    )
    for n in names:
        print(
            f"{n:>10}: {rate[n]:7.2f} samples/s ({cpu_rate[n]:.2f} per CPU-s)  peak RSS {peak[n]:6.0f} MB (training steps {step_peak[n]:6.0f}, "
            f"loaded weights {loaded[n]:5.0f}, growth {growth[n]:6.0f})"
        )
    for n in ours:
        ratio = summary["ratios"][n]
        print(
            f"{n} / published: samples/s {ratio['samples_per_s']:.2f}x "
            f"(per CPU-s {ratio['samples_per_cpu_s']:.2f}x), peak RSS {ratio['peak_rss']:.2f}x, "
            f"training-step peak {ratio['train_phase_peak_rss']:.2f}x, growth {ratio['rss_growth']:.2f}x"
        )
    first = summary["first_step_loss"]
    for n in ours:
        print(
            f"step-0 losses {n} / published: "
            + ", ".join(f"{k} {first[n][k]:.5f} / {first[pub][k]:.5f}" for k in first[pub])
        )
    once = summary["one_time"][ours[0]] if ours else {}
    if once:
        print(
            f"{ours[0]}, one-time: read {once['images']} cached features {once['read_cached_features_s']:.1f} s, "
            f"precompute {once['distinct_texts']} prefixes {once['precompute_prefixes_s']:.1f} s "
            f"({once['prefix_table_mb']:.0f} MB kept); published data loading excluded: "
            f"{summary['published_excluded_data_loading_s']:.1f} s"
        )
    return summary


if __name__ == "__main__":
    main()
