"""Images per second of the embedded encoder's three no-gradient paths, side by side.

    .venv/bin/python bench/encoder_backends.py [--batch 8] [--repeats 5]

Same random pixels through `eager`, `torchscript` and `onnxruntime` (interleaved rounds, so a
noisy machine slows all three alike); prints images/s and the speed-up over eager.
"""

from __future__ import annotations

import argparse
import time

import torch

from fromage.backbones import load_encoder
from fromage.config import EncoderConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    encoder = load_encoder(EncoderConfig())
    pixels = torch.randn(args.batch, 3, encoder.image_size, encoder.image_size)
    backends = ("eager", "torchscript", "onnxruntime")
    seconds = dict.fromkeys(backends, 0.0)
    with torch.no_grad():
        for backend in backends:  # warm-up: trace / export once
            encoder.backend = backend
            encoder(pixels)
        for _ in range(args.repeats):
            for backend in backends:
                encoder.backend = backend
                start = time.perf_counter()
                encoder(pixels)
                seconds[backend] += time.perf_counter() - start
    images = args.batch * args.repeats
    print(
        f"EfficientNet-Lite0 @ {encoder.image_size}px, batch {args.batch}, {torch.get_num_threads()} threads"
    )
    for backend in backends:
        rate = images / seconds[backend]
        print(f"{backend:>12}: {rate:6.1f} images/s  ({seconds['eager'] / seconds[backend]:.2f}x eager)")


if __name__ == "__main__":
    main()
