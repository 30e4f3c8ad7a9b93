"""Image indexing speed: `fromage.apps.indexing.index_collection`, cold vs warm feature cache (issue #6).

    .venv/bin/python bench/index_images.py [--images 400] [--rounds 2] [--checkpoint DIR]

A few hundred real images (Google emoji and easy-VQA test images, half each) listed in a JSONL
file are indexed into a fresh index directory with the shipped model:
- **cold**: an empty feature cache, so every image is decoded, encoded by the frozen encoder and
  embedded (what a first `fromage index` costs);
- **warm**: the features are in the cache already (e.g. training or `fromage features` ran on
  the same images), so only decoding-free lookup, the retrieval map and the index build remain.
The feature cache lives in a temporary `FROMAGE_HOME` (the converted LM and fetched assets are
linked from the real one). The model is loaded once, outside the timings (its load time is
printed). Rounds alternate cold and warm; images/s = images added / seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fromage import paths  # noqa: E402
from fromage.checkpoint import SHIPPED  # noqa: E402


def write_collection(path: Path, count: int) -> int:
    """A JSONL collection of `count` real images: emoji and easy-VQA, half each."""
    from fromage.data.builtin import easyvqa_examples, emoji_examples

    emoji = emoji_examples("google", "all")
    shapes = easyvqa_examples("test")
    half = count // 2
    chosen = emoji[: count - half] + shapes[:half]
    with open(path, "w") as f:
        for e in chosen:
            f.write(json.dumps({"image": e.image, "caption": e.caption}) + "\n")
    return len(chosen)


def temporary_home(real: Path, target: Path) -> None:
    """A FROMAGE_HOME whose feature cache is empty; everything else links to the real one."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("lm", "assets"):
        if (real / name).exists() and not (target / name).exists():
            (target / name).symlink_to(real / name, target_is_directory=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--checkpoint", default=str(SHIPPED))
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)

    real_home = paths.home()
    work = Path(tempfile.mkdtemp(prefix="fromage-index-bench-"))
    try:
        collection = work / "collection.jsonl"
        count = write_collection(collection, args.images)
        home = work / "home"
        temporary_home(real_home, home)
        previous = os.environ.get("FROMAGE_HOME")
        os.environ["FROMAGE_HOME"] = str(home)
        try:
            results = _run(args, collection, home, work)
        finally:
            if previous is None:
                os.environ.pop("FROMAGE_HOME", None)
            else:
                os.environ["FROMAGE_HOME"] = previous
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["images"] = count
    cold, warm = results["cold_images_per_s"], results["warm_images_per_s"]
    print(f"{count} images, {args.rounds} rounds, model load {results['model_load_s']:.1f} s (not timed)")
    print(f"cold feature cache: {cold:7.1f} images/s")
    print(f"warm feature cache: {warm:7.1f} images/s")
    print(f"warm / cold: {warm / cold:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def _run(args: argparse.Namespace, collection: Path, home: Path, work: Path) -> dict[str, Any]:
    from fromage.apps.indexing import index_collection
    from fromage.model import FromageModel

    t0 = time.perf_counter()
    model = FromageModel.from_pretrained(args.checkpoint).eval()
    load_s = time.perf_counter() - t0
    seconds = {"cold": 0.0, "warm": 0.0}
    added = {"cold": 0, "warm": 0}
    for r in range(args.rounds):
        for kind in ("cold", "warm") if r % 2 == 0 else ("warm", "cold"):
            if kind == "cold":
                shutil.rmtree(home / "features", ignore_errors=True)
            elif not (home / "features").exists():  # warm first: fill the cache, untimed
                index_collection(str(collection), args.checkpoint, work / "fill", model=model)
            out = work / f"index-{r}-{kind}"
            report = index_collection(str(collection), args.checkpoint, out, model=model)
            seconds[kind] += report.seconds
            added[kind] += report.added
            shutil.rmtree(out, ignore_errors=True)
    return {
        "rounds": args.rounds,
        "model_load_s": load_s,
        "cold_images_per_s": added["cold"] / seconds["cold"],
        "warm_images_per_s": added["warm"] / seconds["warm"],
        "cold_seconds": seconds["cold"],
        "warm_seconds": seconds["warm"],
    }


if __name__ == "__main__":
    main()
