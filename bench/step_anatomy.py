"""Where a decoded token's time goes in the lean Llama step (issue #17, "one stream near the limit").

    PYTHONPATH=. .venv/bin/python bench/step_anatomy.py [--lm-weights float32,bfloat16,int8]
                                                        [--tokens 64] [--rounds 5] [--mb 512]

For each storage of the frozen weights, on the embedded default (SmolLM2-135M), after a
32-token prompt:

1. step: `LlamaStepper.step` as decoding calls it, ms per token (the output head not included);
2. products alone: the same step's weight products (fused q/k/v, output, gate/up, down of
   every layer), called back to back on the inputs they had in a real step: ms, and the bytes
   they read ÷ that time;
3. the rest alone: the step with every product replaced by its recorded output (no weight is
   read): norms, rotary, cache writes, attention, activations, Python;
4. interleaving: step − products − rest, what running the two together costs beyond their sum.

Best of `--rounds`, each of `--tokens` steps; the triad of `bench/bandwidth.py` first, the load
average recorded before each part.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from bandwidth import _model, triad_bandwidth


PROMPT_TOKENS = 32


class _Recorded:
    """A product that remembers its last input and output (to replay either alone)."""

    def __init__(self, product: Any):
        self.product = product
        self.nbytes = product.nbytes
        self.x = self.out = torch.empty(0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.x = x.clone()
        self.out = self.product(x)
        return self.out


class _Canned:
    """A product that reads no weight: it returns what the real one returned."""

    def __init__(self, recorded: _Recorded):
        self.out = recorded.out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.out


def _best(fn: Callable[[], None], tokens: int, rounds: int) -> float:
    """Best seconds per call of `fn`, over `rounds` rounds of `tokens` calls (one warm-up round)."""
    best = float("inf")
    for r in range(rounds + 1):
        start = time.perf_counter()
        for _ in range(tokens):
            fn()
        if r:
            best = min(best, (time.perf_counter() - start) / tokens)
    return best


def anatomy(kind: str, tokens: int, rounds: int) -> dict[str, float]:
    model = _model("", kind)
    lm, stepper = model.lm, model.lm.stepper
    names = ("qkv", "out", "gate_up", "down")
    with torch.no_grad():
        prompt = torch.tensor([[1, *range(100, 100 + PROMPT_TOKENS - 1)]])
        cache = lm.model(input_ids=prompt, use_cache=True).past_key_values
        x = lm.embed(torch.tensor([[200]]))[0].float()  # (1, d)
        state = stepper.start(cache, PROMPT_TOKENS, PROMPT_TOKENS + (rounds + 1) * tokens + 2)

        def step() -> None:
            stepper.step(x, state)

        load = os.getloadavg()[0]
        full = _best(step, tokens, rounds)
        real = {name: getattr(stepper, name) for name in names}
        recorded = {name: [_Recorded(p) for p in products] for name, products in real.items()}
        for name in names:
            setattr(stepper, name, recorded[name])
        step()  # every product records its input and output once
        order = [recorded[name][i] for i in range(stepper.layers) for name in names]

        def products() -> None:
            for r in order:
                r.product(r.x)

        alone = _best(products, tokens, rounds)
        for name in names:
            setattr(stepper, name, [_Canned(r) for r in recorded[name]])
        state.length = PROMPT_TOKENS  # the same attention lengths as the timed steps
        rest = _best(step, tokens, rounds)
        for name in names:
            setattr(stepper, name, real[name])
    weight_bytes = sum(r.nbytes for r in order)
    return {"load": load, "step": full, "products": alone, "rest": rest, "bytes": weight_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm-weights", default="float32,bfloat16,int8")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mb", type=int, default=512, help="size of each triad array")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    bandwidth = triad_bandwidth(args.mb, 10)
    print(
        f"triad: {bandwidth / 1e9:.2f} GB/s ({torch.get_num_threads()} threads; load average before {load:.2f})"
    )
    print(
        "\n| LM weights | load before | step (ms) | products alone (ms, GB/s) | rest alone (ms) "
        "| interleaving (ms) | products ÷ triad time |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind in args.lm_weights.split(","):
        a = anatomy(kind, args.tokens, args.rounds)
        ms = {k: a[k] * 1e3 for k in ("step", "products", "rest")}
        interleaving = ms["step"] - ms["products"] - ms["rest"]
        triad_ms = a["bytes"] / bandwidth * 1e3
        print(
            f"| {kind} | {a['load']:.2f} | {ms['step']:.1f} | {ms['products']:.1f} "
            f"({a['bytes'] / a['products'] / 1e9:.1f} GB/s) | {ms['rest']:.1f} | {interleaving:.1f} "
            f"| {triad_ms / ms['products']:.2f} |"
        )


if __name__ == "__main__":
    main()
