"""The weight products of a prompt (many rows) under each storage (issue #17, prefill).

    PYTHONPATH=. .venv/bin/python bench/prompt_products.py [--rows 8,16,32,64,128,512] [--runs 4]

30 layers' worth of SmolLM2-135M's products (q/k/v, output, gate/up, down; distinct random
weights, so they stream from memory as in a real forward), 2 threads, best of `--runs`:

- bf16 weights: upcast to float32 then multiplied (what `BF16WeightLinear` does above
  `max_rows` on CPUs without bf16 units), or multiplied in bf16 (on CPUs with them);
- float32 weights, for reference;
- int8 rows: dequantised to float32, the int8 kernel (`torch._weight_int8pack_mm`), or
  converted to bf16 with the row scales applied to the float32 result (`Int8WeightLinear`
  above `max_rows` with `wide_bf16`).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fromage.backbones.bf16_weights import native_bf16
from fromage.backbones.int8_weights import quantize_rows

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # one layer's fused products
LAYERS = 30


def best_of(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def contenders(rows: int, weights: list, bf16: list, int8: list) -> dict[str, Callable[[], object]]:
    x = {i: torch.randn(rows, i) for i in (576, 1536)}
    xb = {i: v.bfloat16() for i, v in x.items()}
    return {
        "bf16 upcast": lambda: [F.linear(x[w.shape[1]], w.float()) for w in bf16],
        "bf16 product": lambda: [F.linear(xb[w.shape[1]], w).float() for w in bf16],
        "float32": lambda: [F.linear(x[w.shape[1]], w) for w in weights],
        "int8 dequantised": lambda: [F.linear(x[q.shape[1]], q.float() * s[:, None]) for q, s in int8],
        "int8 kernel": lambda: [
            torch._weight_int8pack_mm(xb[q.shape[1]], q, s.bfloat16()).float() for q, s in int8
        ],
        "int8 via bf16": lambda: [
            F.linear(xb[q.shape[1]], q.to(torch.bfloat16)).float() * s for q, s in int8
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="8,16,32,64,128,512")
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(o, i) * 0.02 for o, i in SHAPES * LAYERS]
    bf16 = [w.bfloat16() for w in weights]
    int8 = [quantize_rows(w) for w in weights]
    print(
        f"{LAYERS} layers, {torch.get_num_threads()} threads, bf16 units: {native_bf16()}; "
        f"load average before {os.getloadavg()[0]:.2f}\n"
    )
    print(
        "| rows | bf16 upcast | bf16 product | float32 weights | int8 dequantised | int8 kernel | int8 via bf16 |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for rows in (int(r) for r in args.rows.split(",")):
        ms = [best_of(fn, args.runs) * 1e3 for fn in contenders(rows, weights, bf16, int8).values()]
        print(f"| {rows} | " + " | ".join(f"{m:.1f} ms" for m in ms) + " |")


if __name__ == "__main__":
    main()
