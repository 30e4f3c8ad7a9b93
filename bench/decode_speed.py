"""Text-generation speed on the embedded default, side by side in one run (issue #3).

    .venv/bin/python bench/decode_speed.py [--checkpoint DIR] [--rounds 3] [--lm-weights bfloat16]
    .venv/bin/python bench/decode_speed.py --batch 1,4,16 [--lm-weights bfloat16]

64 new tokens after a 32-token prompt, greedy, EOS ignored so every run makes all 64:
- `decode` with the KV cache vs `decode(use_cache=False)` (full recomputation each token) on an
  interleaved prompt (text, one image = k visual tokens, text);
- `decode` vs `transformers`' own `generate()` on the same text-only prompt.
Rounds interleave the contenders so machine noise hits all alike. Weights do not change the
speed; an untrained model is used when no checkpoint is given. `--lm-weights bfloat16` (or `int8`)
stores the frozen LM's linear weights in bf16 (backbones/bf16_weights.py; int8 rows with
scales, backbones/int8_weights.py) for *every* contender, `generate()` included, and lets
`decode`'s cached steps use the lean fused Llama step (backbones/fast_llama.py, tested token
for token against the Hugging Face layers); recomputation on float32 weights then joins as
the strongest baseline, and the ratio is also given against the fastest recomputation.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from fromage.backbones import load_lm
from fromage.backbones.lm import WEIGHT_STORAGE
from fromage.config import TrainConfig
from fromage.generate import GenerationConfig, decode, decode_batch
from fromage.model import FromageModel
from fromage.tokens import IMAGE_TOKEN_ID, SpecialTokens

PROMPT_TOKENS = 32
NEW_TOKENS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--batch",
        default="",
        help="comma-separated row counts, e.g. 1,4,16: aggregate tokens/s of batched decoding "
        "(BatchDecoder, one forward per step) instead of the single-stream contenders",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="frozen LM weights"
    )
    parser.add_argument(
        "--lm-weights",
        default="float32",
        choices=list(WEIGHT_STORAGE),
        help="storage of the frozen LM's linear weights (activations stay float32)",
    )
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.checkpoint:
        model = FromageModel.from_pretrained(args.checkpoint, load_encoder=False, dtype=dtype)
        tokenizer = load_lm(model.config.lm)[1]
    else:
        config = TrainConfig().model
        config.lm.dtype = args.dtype
        lm, tokenizer = load_lm(config.lm)
        model = FromageModel(config, lm, feature_dim=1280)
    model.eval()
    # bf16/int8: decode's cached steps use the lean fused Llama step; recomputation and
    # generate() run the Hugging Face layers on the same stored weights.
    model.lm.store_weights(args.lm_weights, model.config.ret_layer)
    if dtype != torch.float32:  # HF generate() runs the same weights as decode
        model.lm.model.to(dtype)
    k = model.config.num_visual_tokens
    text = tokenizer(
        "Q: what is in this picture and what does it remind you of? A:", add_special_tokens=False
    )["input_ids"]
    text = (text * 4)[: PROMPT_TOKENS - k - 1]
    half = len(text) // 2
    interleaved = torch.tensor([[tokenizer.bos_token_id, *text[:half], *[IMAGE_TOKEN_ID] * k, *text[half:]]])
    feats = torch.randn(1, model.config.feature_dim)
    text_only = torch.tensor([[tokenizer.bos_token_id, *(text * 2)[: PROMPT_TOKENS - 1]]])
    assert interleaved.shape[1] == text_only.shape[1] == PROMPT_TOKENS
    # EOS never matches, so each run produces exactly NEW_TOKENS tokens.
    special = SpecialTokens(bos=tokenizer.bos_token_id, eos=-1, pad=0)
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, max_rets=0)

    if args.batch:
        run_batches(model, interleaved, feats, special, gen, [int(b) for b in args.batch.split(",")], args)
        return

    def ours(ids: torch.Tensor, images: torch.Tensor | None, cache: bool) -> Callable[[], int]:
        return lambda: len(list(decode(model, ids, images, special, gen, use_cache=cache)))

    def hf() -> int:
        out = model.lm.model.generate(
            text_only,
            attention_mask=torch.ones_like(text_only),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
        return int(out.shape[1] - text_only.shape[1])

    contenders = {
        "interleaved, KV cache (decode)": ours(interleaved, feats, True),
        "interleaved, full recomputation": ours(interleaved, feats, False),
        "text-only, KV cache (decode)": ours(text_only, None, True),
        "text-only, transformers generate()": hf,
    }
    if args.lm_weights != "float32":
        # The strongest baseline too: recomputation with the float32 weights (no upcasts or
        # dequantisation of every weight in every forward).
        fp32 = (
            FromageModel.from_pretrained(args.checkpoint, load_encoder=False)
            if args.checkpoint
            else FromageModel(TrainConfig().model, load_lm(TrainConfig().model.lm)[0], feature_dim=1280)
        ).eval()
        contenders["interleaved, full recomputation, fp32 weights"] = lambda: len(
            list(decode(fp32, interleaved, feats, special, gen, use_cache=False))
        )
    load = os.getloadavg()[0]
    rate = tokens_per_second(contenders, args.rounds)
    print(
        f"{PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, {args.rounds} rounds, "
        f"{torch.get_num_threads()} threads, LM {args.dtype}, linear weights {args.lm_weights}; "
        f"load average before {load:.2f}, after {os.getloadavg()[0]:.2f}"
    )
    for name in contenders:
        print(f"{name:>36}: {rate[name]:7.1f} tokens/s")
    names = list(contenders)
    print(f"KV cache / full recomputation: {rate[names[0]] / rate[names[1]]:.2f}x")
    best = max((n for n in names if "full recomputation" in n), key=rate.__getitem__)
    print(f"KV cache / the fastest full recomputation ({best}): {rate[names[0]] / rate[best]:.2f}x")
    print(f"decode / transformers generate (text-only): {rate[names[2]] / rate[names[3]]:.2f}x")


def tokens_per_second(contenders: dict[str, Callable[[], int]], rounds: int) -> dict[str, float]:
    """A warm-up call each, then `rounds` rounds that interleave the contenders (machine noise
    hits all alike); each call returns the tokens it produced."""
    seconds, tokens = dict.fromkeys(contenders, 0.0), dict.fromkeys(contenders, 0)
    with torch.no_grad():
        for fn in contenders.values():
            fn()
        for _ in range(rounds):
            for name, fn in contenders.items():
                start = time.perf_counter()
                tokens[name] += fn()
                seconds[name] += time.perf_counter() - start
    return {name: tokens[name] / seconds[name] for name in contenders}


def run_batches(model, prompt, feats, special, gen, sizes: list[int], args) -> None:
    """Aggregate tokens/s of B rows decoded together (the interleaved prompt in every row)."""
    ids = prompt[0].tolist()

    def batched(rows: int) -> Callable[[], int]:
        def run() -> int:
            steps = decode_batch(model, [ids] * rows, [feats] * rows, special, gen)
            return sum(len(s) for s in steps)

        return run

    contenders = {f"{b} row(s), batched decode": batched(b) for b in sizes}
    load = os.getloadavg()[0]
    rate = tokens_per_second(contenders, args.rounds)
    print(
        f"{PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens per row, {args.rounds} rounds, "
        f"{torch.get_num_threads()} threads, linear weights {args.lm_weights}; "
        f"load average before {load:.2f}, after {os.getloadavg()[0]:.2f}"
    )
    first = next(iter(contenders))
    for name in contenders:
        print(
            f"{name:>28}: {rate[name]:7.1f} tokens/s  ({rate[name] / rate[first]:.2f}x {first.split(',')[0]})"
        )


if __name__ == "__main__":
    main()
