"""`fromage features` on webdataset shards: 1 vs 2 worker processes, side by side.

    .venv/bin/python bench/feature_shards.py [--images 480] [--per-shard 60] [--rounds 3]

Packs real easy-VQA images (64 px PNGs, captions as `.txt`, metadata as `.json`, members named
like img2dataset's) into tar shards, then runs the real command (`python -m fromage.cli features
'DIR/{00000..000NN}.tar' --num-processes P`, the shipped model's EfficientNet-Lite0 @ 224 px)
with a cold feature cache each time (a fresh FROMAGE_HOME), alternating the contenders and which
goes first over several rounds, so a noisy machine slows both alike. Wall time covers everything
a user waits for: interpreter start, listing, encoder load, decoding, encoding, cache writes.
Finally one re-run on a warm cache shows what an up-to-date collection costs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path


def pack_shards(out_dir: Path, images: int, per_shard: int) -> str:
    """Write `images` easy-VQA samples as img2dataset-style shards; return the brace pattern."""
    from fromage.data.builtin import easyvqa_examples

    examples = easyvqa_examples("train")[:images]
    if len(examples) < images:
        raise SystemExit(f"easy-VQA has {len(examples)} training images, asked for {images}")
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = (len(examples) + per_shard - 1) // per_shard
    for s in range(shards):
        with tarfile.open(out_dir / f"{s:05d}.tar", "w") as tar:
            for i, example in enumerate(examples[s * per_shard : (s + 1) * per_shard]):
                key = f"{s:05d}/{s:05d}{i:04d}"
                meta = {"key": key, "status": "success", "caption": example.caption}
                for extension, data in (
                    ("png", Path(example.image).read_bytes()),
                    ("txt", example.caption.encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(out_dir / f"{{00000..{shards - 1:05d}}}.tar")


def run_features(pattern: str, processes: int, home: Path) -> tuple[float, str]:
    """Wall seconds of one `fromage features` run and its printed summary."""
    env = {**os.environ, "FROMAGE_HOME": str(home), "PYTHONPATH": str(Path(__file__).parents[1])}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "fromage.cli", "features", pattern, "--num-processes", str(processes)],
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"fromage features failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--per-shard", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    contenders = (1, 2)
    with tempfile.TemporaryDirectory(prefix="fromage-bench-") as tmp:
        root = Path(tmp)
        pattern = pack_shards(root / "shards", args.images, args.per_shard)
        walls: dict[int, list[float]] = {p: [] for p in contenders}
        for r in range(args.rounds):
            order = contenders if r % 2 == 0 else contenders[::-1]
            for processes in order:
                seconds, out = run_features(pattern, processes, root / f"home-{r}-{processes}")
                if f"encoded {args.images}," not in out:
                    raise SystemExit(f"expected {args.images} images encoded, got:\n{out}")
                walls[processes].append(seconds)
                print(f"round {r + 1}, {processes} process(es): {seconds:6.1f} s", flush=True)
        warm, out = run_features(pattern, 1, root / "home-0-1")  # everything cached already
        if f"encoded 0, cached {args.images}" not in out:
            raise SystemExit(f"expected a fully cached re-run, got:\n{out}")
    print(
        f"\n{args.images} easy-VQA images in {args.per_shard}-image shards, {os.cpu_count()} CPUs, cold cache"
    )
    for processes in contenders:
        median = statistics.median(walls[processes])
        print(
            f"  {processes} process(es): median {median:6.1f} s wall, {args.images / median:6.1f} images/s "
            f"(runs: {', '.join(f'{s:.1f}' for s in walls[processes])})"
        )
    ratio = statistics.median(walls[1]) / statistics.median(walls[2])
    print(f"  2 processes vs 1: {ratio:.2f}x images/s")
    print(f"  re-run on a warm cache (1 process): {warm:.1f} s")


if __name__ == "__main__":
    main()
