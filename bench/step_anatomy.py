"""Where a decoded token's time goes in the lean Llama step (issue #17, "one stream near the limit").

    PYTHONPATH=. .venv/bin/python bench/step_anatomy.py [--lm-weights float32,bfloat16,int8]
                                                        [--tokens 64] [--rounds 5] [--mb 512]

For each storage of the frozen weights, on the embedded default (SmolLM2-135M), after a
32-token prompt:

1. step: `LlamaStepper.step` as decoding calls it (its layers as TorchScript), ms per token
   (the output head not included); and the same layers run as plain Python;
2. products alone: the step's weight products (fused q/k/v, output, gate/up, down of every
   layer), called back to back on the inputs they had in a real step: ms, and the bytes they
   read ÷ that time;
3. the rest alone: the plain-Python step with every product replaced by its recorded output
   (no weight is read): norms, rotary, cache writes, attention, activations, Python;
4. interleaving: plain-Python step − products − rest, what running the two together costs
   beyond their sum.

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

from fromage.backbones import fast_llama


PROMPT_TOKENS = 32


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
    """The step as decoding runs it (TorchScript), then the same layers as plain Python with
    `fast_llama._product` swapped: recorded, replayed alone, and canned (no weight read)."""
    model = _model("", kind)
    lm, stepper = model.lm, model.lm.stepper
    real_product, scripted = fast_llama._product, fast_llama._scripted_layers
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]] = []

    def recording(x: torch.Tensor, held: torch.Tensor, scale: torch.Tensor, kind: int) -> torch.Tensor:
        out = real_product(x, held, scale, kind)
        calls.append((x.clone(), held, scale, kind, out))
        return out

    canned = iter(())

    def replaying(x: torch.Tensor, held: torch.Tensor, scale: torch.Tensor, kind: int) -> torch.Tensor:
        return next(canned)

    with torch.no_grad():
        prompt = torch.tensor([[1, *range(100, 100 + PROMPT_TOKENS - 1)]])
        cache = lm.model(input_ids=prompt, use_cache=True).past_key_values
        x = lm.embed(torch.tensor([[200]]))[0].float()  # (1, d)
        state = stepper.start(cache, PROMPT_TOKENS, PROMPT_TOKENS + 3 * (rounds + 1) * tokens + 2)

        def step() -> None:
            stepper.step(x, state)

        load = os.getloadavg()[0]
        full = _best(step, tokens, rounds)
        fast_llama._scripted_layers = lambda: fast_llama._layers  # type: ignore[assignment]
        try:
            eager = _best(step, tokens, rounds)
            fast_llama._product = recording
            step()  # every product records its input and output once
            fast_llama._product = real_product

            def products() -> None:
                for x_in, held, scale, k, _ in calls:
                    real_product(x_in, held, scale, k)

            alone = _best(products, tokens, rounds)

            def canned_step() -> None:
                nonlocal canned
                canned = iter([out for *_, out in calls])
                step()

            fast_llama._product = replaying
            state.length = PROMPT_TOKENS  # the same attention lengths as the timed steps
            rest = _best(canned_step, tokens, rounds)
        finally:
            fast_llama._product, fast_llama._scripted_layers = real_product, scripted
    weight_bytes = sum(held.numel() * held.element_size() + scale.numel() * 2 for _, held, scale, _, _ in calls)
    return {"load": load, "step": full, "eager": eager, "products": alone, "rest": rest, "bytes": weight_bytes}


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
        "\n| LM weights | load before | step (ms) | step as plain Python (ms) | products alone (ms, GB/s) "
        "| rest alone (ms) | interleaving (ms) | products ÷ triad time |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind in args.lm_weights.split(","):
        a = anatomy(kind, args.tokens, args.rounds)
        ms = {k: a[k] * 1e3 for k in ("step", "eager", "products", "rest")}
        interleaving = ms["eager"] - ms["products"] - ms["rest"]
        triad_ms = a["bytes"] / bandwidth * 1e3
        print(
            f"| {kind} | {a['load']:.2f} | {ms['step']:.1f} | {ms['eager']:.1f} | {ms['products']:.1f} "
            f"({a['bytes'] / a['products'] / 1e9:.1f} GB/s) | {ms['rest']:.1f} | {interleaving:.1f} "
            f"| {triad_ms / ms['products']:.2f} |"
        )


if __name__ == "__main__":
    main()
