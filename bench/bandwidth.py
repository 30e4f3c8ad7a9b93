"""This machine's memory bandwidth (a STREAM-style triad) and single-stream decoding as a
fraction of the bound it sets (issue #17).

    .venv/bin/python bench/bandwidth.py [--checkpoint DIR] [--mb 512] [--runs 10] [--rounds 3]
                                        [--lm-weights float32,bfloat16,int8]

1. Triad `a = b + s·c` over three float32 arrays of `--mb` MB each (several times any
   last-level cache), in torch with the threads decoding uses; bytes counted as STREAM does
   (read b and c, write a: 3 × size per run); best of `--runs`.
2. Single-stream decode of the embedded default (SmolLM2-135M, the fused Llama step) with the
   linear weights stored in each of `--lm-weights` (float32, bf16, int8 rows with scales):
   64 new tokens after a 32-token prompt, greedy, EOS ignored; tokens/s from the first token
   to the last (prefill left out), best of interleaved rounds. (The float32 row is the lean
   step on float32 weights; `Fromage`'s `lm_weights="float32"` runs the Hugging Face layers.)
3. Bytes read per token, per storage: every weight the step multiplies (the fused per-layer
   matrices and the output head in their storage, the norms) plus the KV cache read at the
   mean position. The bound is bandwidth ÷ bytes per token; the fraction is decode ÷ bound.

The triad and the decode run in the same process, one after the other, with the load average
recorded before each.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from fromage.backbones import load_lm
from fromage.backbones.lm import WEIGHT_STORAGE
from fromage.config import TrainConfig
from fromage.generate import GenerationConfig, decode
from fromage.model import FromageModel
from fromage.tokens import SpecialTokens

PROMPT_TOKENS = 32
NEW_TOKENS = 64


def triad_bandwidth(mb: int, runs: int) -> float:
    """Best bytes/s of a = b + s·c over float32 arrays of `mb` MB each."""
    n = mb * 1024 * 1024 // 4
    b, c = torch.rand(n), torch.rand(n)
    a = torch.empty(n)
    best = float("inf")
    for _ in range(runs + 1):  # the first run warms the pages
        start = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best = min(best, time.perf_counter() - start)
    return 3 * n * 4 / best


def bytes_per_token(model: FromageModel) -> int:
    """Bytes the fused step reads per token: its weights, the head, the norms, the KV cache."""
    stepper = model.lm.stepper
    total = stepper.weight_bytes
    head = model.lm.head
    product = getattr(head, "product", None)  # an int8-stored head
    total += product.nbytes if product is not None else head.weight.numel() * head.weight.element_size()
    # Keys and values up to the mean position of the generated tokens, float32.
    mean_length = PROMPT_TOKENS + NEW_TOKENS // 2
    total += 2 * stepper.layers * stepper.kv_heads * stepper.head_dim * mean_length * 4
    return int(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--mb", type=int, default=512, help="size of each triad array")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--lm-weights", default="float32,bfloat16,int8", help="comma-separated storages to compare"
    )
    args = parser.parse_args()
    threads = torch.get_num_threads()
    load = os.getloadavg()[0]
    bandwidth = triad_bandwidth(args.mb, args.runs)
    print(
        f"triad: {bandwidth / 1e9:.2f} GB/s ({3 * args.mb} MB per run, best of {args.runs}, "
        f"{threads} threads; load average before {load:.2f})"
    )

    storages = args.lm_weights.split(",")
    models = {kind: _model(args.checkpoint, kind) for kind in storages}
    tokenizer = load_lm(next(iter(models.values())).config.lm)[1]
    text = tokenizer(
        "Q: what is in this picture and what does it remind you of? A:", add_special_tokens=False
    )["input_ids"]
    prompt = torch.tensor([[tokenizer.bos_token_id, *(text * 4)[: PROMPT_TOKENS - 1]]])
    special = SpecialTokens(bos=tokenizer.bos_token_id, eos=-1, pad=0)  # EOS never matches
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, max_rets=0)
    load = os.getloadavg()[0]
    best = dict.fromkeys(storages, 0.0)
    with torch.no_grad():
        for model in models.values():
            list(decode(model, prompt, None, special, gen))  # warm-up
        for _ in range(args.rounds):  # interleaved, so noise hits every storage alike
            for kind, model in models.items():
                # Steady state: from the first token to the last (the prompt's prefill left out).
                stamps = [time.perf_counter() for _ in decode(model, prompt, None, special, gen)]
                best[kind] = max(best[kind], (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    print(
        f"decode: best of {args.rounds} interleaved rounds of {NEW_TOKENS} tokens; load average before {load:.2f}"
    )
    print("\n| LM weights | bytes read per token | bound (tokens/s) | decode (tokens/s) | decode ÷ bound |")
    print("|---|---:|---:|---:|---:|")
    for kind, model in models.items():
        per_token = bytes_per_token(model)
        bound = bandwidth / per_token
        print(
            f"| {kind} | {per_token / 1e6:.1f} MB | {bound:.1f} | {best[kind]:.1f} | {best[kind] / bound:.2f} |"
        )


def _model(checkpoint: str, kind: str) -> FromageModel:
    """The embedded default (or a checkpoint) with its linear weights stored as `kind`, decoding
    with the lean step (float32 included: the step, not the Hugging Face layers)."""
    if checkpoint:
        model = FromageModel.from_pretrained(checkpoint, load_encoder=False)
    else:
        config = TrainConfig().model
        model = FromageModel(config, load_lm(config.lm)[0], feature_dim=1280)
    model.eval()
    # bf16/int8: stored and the lean step built; float32 keeps its weights, so build the step here.
    stepping = model.lm.store_weights(kind, model.config.ret_layer)
    if not (stepping or model.lm.enable_fast_decode(model.config.ret_layer, WEIGHT_STORAGE[kind])):
        raise SystemExit("the fused step needs a Llama-family LM")
    return model


if __name__ == "__main__":
    main()
