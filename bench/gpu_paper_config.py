"""The paper configuration on one GPU, randomly initialised (issue #6, item 5).

    .venv/bin/python bench/gpu_paper_config.py --out results.json          # one H200, < 6 minutes
    .venv/bin/python bench/gpu_paper_config.py --tiny --out /tmp/tiny.json  # same code path, CPU

Builds OPT-6.7B (hidden 4096, 32 layers, 32 heads, FFN 16384, vocab 50272, 2048 positions) and the
CLIP ViT-L/14 vision tower (hidden 1024, 24 layers, 16 heads, MLP 4096, 224 px, patch 14) from
their configs (no download, random weights: speed does not depend on the values), with the
paper's head (DESIGN §2): k = 1 visual token, 256-d retrieval space, `[RET]` from the last layer.
Frozen weights in bf16, trained maps in fp32 under bf16 autocast, as `fromage train` runs on CUDA.

Measures, in this order:
1. feature extraction: CLIP ViT-L/14 images/s (the one-time encoder pass whose output the
   training loop reads from the feature cache);
2. `--steps` training steps of `fromage.training.step.train_step` at batch `--batch` (captioning pass
   with full backward into the visual-token map; retrieval pass whose frozen `[BOS] caption`
   prefix is computed per step without autograd — at CC3M scale the prefixes of 3.3M captions
   cannot be kept — and only `[RET]` runs with gradients), AdamW, clipping, `[RET]` rescale:
   samples/s, model FLOPs utilisation, peak GPU memory;
3. the projected time of one CC3M epoch (3.3M pairs): feature extraction + training;
4. generation tokens/s with the KV cache (`fromage.generate.decode`, batch 1, greedy).

Model FLOPs (stated so the MFU can be checked; N = non-embedding LM parameters, d hidden, V vocab,
real (non-padding) tokens only, attention score FLOPs ignored: T <= 54 makes them < 1%):
- captioning pass: 2N per token forward + 2N per token backward (input gradients only: the
  frozen weights get no weight gradient), + 4dV per labelled position (head forward + input grad);
- retrieval pass: 2N per prefix token forward (no autograd) + 2dV per prefix position (frozen
  logits) + the `[RET]` step, 4N + 4dV per row (forward + input gradient);
- the trained maps are < 0.1% and left out. Peak: `--peak-tflops` (H200 bf16 dense: 989).
Synthetic data: caption lengths uniform in 6..24 tokens (CC3M captions average ~10-12 words),
random token ids, random cached features; interleaving with probability 0.5 as in training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs only: never reach for the hub

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fromage.backbones import FrozenLM, build_hf_vision  # noqa: E402
from fromage.config import ModelConfig, TrainConfig  # noqa: E402
from fromage.data.dataset import Split  # noqa: E402
from fromage.generate import GenerationConfig, decode  # noqa: E402
from fromage.model import FromageModel, TextPrefix  # noqa: E402
from fromage.tokens import SpecialTokens  # noqa: E402
from fromage.training.step import StepData, StepInput, train_step  # noqa: E402

CC3M_PAIRS = 3_300_000
H200_BF16_TFLOPS = 989.0


def configs(tiny: bool) -> tuple[Any, Any]:
    from transformers import CLIPVisionConfig, OPTConfig

    if tiny:
        lm = OPTConfig(
            vocab_size=512,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=128,
        )
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
        return lm, vision
    lm = OPTConfig(  # facebook/opt-6.7b
        vocab_size=50272,
        hidden_size=4096,
        ffn_dim=16384,
        num_hidden_layers=32,
        num_attention_heads=32,
        word_embed_proj_dim=4096,
        max_position_embeddings=2048,
        do_layer_norm_before=True,
        tie_word_embeddings=True,
    )
    vision = CLIPVisionConfig(  # openai/clip-vit-large-patch14
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=768,
    )
    return lm, vision


def build(tiny: bool, device: torch.device, dtype: torch.dtype) -> FromageModel:
    """Random OPT + CLIP vision tower created directly on `device` in `dtype` (no CPU init pass)."""
    from transformers import CLIPVisionModel, OPTForCausalLM

    lm_config, vision_config = configs(tiny)
    torch.manual_seed(0)
    with torch.device(device):
        lm = OPTForCausalLM._from_config(lm_config, dtype=dtype)
        vision = CLIPVisionModel._from_config(vision_config, dtype=dtype)
    encoder = build_hf_vision(vision, "clip-vit-l14-random", int(vision_config.image_size))
    config = ModelConfig(num_visual_tokens=1, retrieval_dim=256, ret_layer=-1, feature_dropout=0.0)
    config.lm.dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
    return FromageModel(config, FrozenLM(lm), encoder).to(device)


def lm_params(model: FromageModel) -> tuple[int, int, int]:
    """(non-embedding parameters N, hidden d, vocab V) of the frozen LM."""
    total = sum(p.numel() for p in model.lm.parameters())
    embeddings = sum(p.numel() for n, p in model.lm.named_parameters() if "embed" in n)
    return total - embeddings, model.lm.hidden_size, model.lm.vocab_size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_encoder(
    model: FromageModel, device: torch.device, dtype: torch.dtype, batch: int, rounds: int
) -> float:
    """Images/s of the frozen encoder's forward on random pixels (the one-time feature pass)."""
    assert model.encoder is not None
    size = model.encoder.image_size
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    with torch.no_grad():
        model.encoder(pixels)  # warm-up (kernel selection)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(rounds):
            model.encoder(pixels)
        sync(device)
    return batch * rounds / (time.perf_counter() - t0)


def bench_training(model: FromageModel, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    config = TrainConfig()
    config.model = model.config
    config.batch_size = config.retrieval_batch_size = args.batch
    rng = random.Random(0)
    vocab = model.lm.vocab_size
    special = SpecialTokens(bos=2, eos=2, pad=1)  # OPT's
    pool = args.batch * 4
    texts = [[rng.randrange(4, vocab) for _ in range(rng.randint(6, 24))] for _ in range(pool)]
    split = Split([], torch.randn(1, pool, model.config.feature_dim, device=device))  # cached features
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    n_params, d, v = lm_params(model)
    bf16 = device.type == "cuda"
    model.train()
    times: list[float] = []
    flops: list[float] = []
    losses: list[float] = []
    budget_end = time.perf_counter() + args.max_train_seconds
    for step in range(args.warmup + args.steps):
        cap_idx = rng.sample(range(pool), args.batch)
        ret_idx = rng.sample(range(pool), args.batch)
        interleave = rng.random() < 0.5
        sync(device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            # The frozen prefix of this step's retrieval texts, without autograd (training/prefixes.py's
            # `precompute_prefixes` does this once per caption on small data).
            prefixes = _prefixes(model, [texts[i] for i in ret_idx], special, device)
            row_of = torch.zeros(pool, dtype=torch.long)  # example -> its row in `prefixes`
            row_of[torch.tensor(ret_idx)] = torch.arange(args.batch)
            data = StepData(split, prefixes, row_of, torch.arange(pool), special)
            batch = StepInput(cap_idx, [texts[i] for i in cap_idx], ret_idx, interleave)
            out = train_step(model, data, batch, config, generator, device)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        model.rescale_ret_embedding()
        sync(device)
        elapsed = time.perf_counter() - t0
        losses.append(out["loss"])
        if step >= args.warmup:
            times.append(elapsed)
            cap_tokens = sum(len(texts[i]) + 2 + model.config.num_visual_tokens for i in cap_idx)
            cap_labels = sum(len(texts[i]) + 1 for i in cap_idx)
            ret_tokens = sum(len(texts[i]) + 1 for i in ret_idx)
            flops.append(
                4 * n_params * cap_tokens
                + 4 * d * v * cap_labels
                + 2 * n_params * ret_tokens
                + 2 * d * v * ret_tokens
                + (4 * n_params + 4 * d * v) * args.batch
            )
            if time.perf_counter() > budget_end:
                break
    seconds = sum(times)
    achieved = sum(flops) / max(seconds, 1e-9)
    return {
        "timed_steps": len(times),
        "samples_per_s": len(times) * args.batch / max(seconds, 1e-9),
        "seconds_per_step": seconds / max(len(times), 1),
        "model_tflops_per_s": achieved / 1e12,
        "mfu": achieved / (args.peak_tflops * 1e12),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "finite": all(math.isfinite(x) for x in losses),
    }


def _prefixes(
    model: FromageModel, texts: list[list[int]], special: SpecialTokens, device: torch.device
) -> TextPrefix:
    from fromage.data.collate import retrieval_prefix_batch

    ids, mask = retrieval_prefix_batch(texts, special)
    return model.encode_text_prefix(ids.to(device), mask.to(device))


def bench_generation(model: FromageModel, device: torch.device, new_tokens: int) -> float:
    """Tokens/s of `decode` with the KV cache: one image + a 32-token prompt, greedy, EOS never hit."""
    from fromage.tokens import IMAGE_TOKEN_ID

    model.eval()
    rng = random.Random(1)
    prompt = [2, *[IMAGE_TOKEN_ID] * model.config.num_visual_tokens] + [
        rng.randrange(4, model.lm.vocab_size) for _ in range(31)
    ]
    ids = torch.tensor([prompt])
    feats = torch.randn(1, model.config.feature_dim)
    special = SpecialTokens(bos=2, eos=-1, pad=1)
    gen = GenerationConfig(max_new_tokens=new_tokens, max_rets=0)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        list(decode(model, ids, feats, special, gen))  # warm-up
        sync(device)
        t0 = time.perf_counter()
        made = len(list(decode(model, ids, feats, special, gen)))
        sync(device)
    return made / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU, the same code path")
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--batch", type=int, default=0, help="default 180 (paper), 4 with --tiny")
    parser.add_argument("--steps", type=int, default=0, help="timed steps; default 50, 3 with --tiny")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-train-seconds", type=float, default=210.0, help="stop timing steps after this")
    parser.add_argument("--gen-tokens", type=int, default=0, help="default 64, 4 with --tiny")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="bf16 dense peak")
    args = parser.parse_args(argv)
    args.batch = args.batch or (4 if args.tiny else 180)
    args.steps = args.steps or (3 if args.tiny else 50)
    args.gen_tokens = args.gen_tokens or (4 if args.tiny else 64)
    if args.tiny:
        args.warmup = min(args.warmup, 1)
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --tiny for the CPU check")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    started = time.perf_counter()
    t0 = time.perf_counter()
    model = build(args.tiny, device, dtype)
    build_s = time.perf_counter() - t0
    n_params, d, v = lm_params(model)
    images_per_s = bench_encoder(
        model, device, dtype, batch=8 if args.tiny else 256, rounds=2 if args.tiny else 5
    )
    training = bench_training(model, args, device)
    tokens_per_s = bench_generation(model, device, args.gen_tokens)
    epoch_train_h = CC3M_PAIRS / training["samples_per_s"] / 3600
    epoch_features_h = CC3M_PAIRS / images_per_s / 3600
    results = {
        "scale": "tiny" if args.tiny else "paper",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "batch": args.batch,
        "lm_non_embedding_params": n_params,
        "hidden": d,
        "vocab": v,
        "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
        "build_seconds": build_s,
        "encoder_images_per_s": images_per_s,
        "training": training,
        "peak_tflops": args.peak_tflops,
        "cc3m_epoch_hours": {
            "feature_extraction": epoch_features_h,
            "training": epoch_train_h,
            "total": epoch_features_h + epoch_train_h,
        },
        "generation_tokens_per_s": tokens_per_s,
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
        "wall_seconds": time.perf_counter() - started,
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
