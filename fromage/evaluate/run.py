"""One entry point per benchmark: load, evaluate, write `results.json`, `results.md` (and a PNG
where a picture says more). `fromage eval TASK` calls these; so can Python:

    from fromage.evaluate.run import eval_offline
    results = eval_offline("fromage/weights/default", out_dir="runs/eval-offline")
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..checkpoint import checkpoint_digest
from ..fileio import sha256_file
from .engine import Evaluator
from .report import TaskResult, write_results

TASKS = ("offline", "vist", "visdial-retrieval", "visdial-answers", "collection")


def _model_info(checkpoint: str | Path) -> dict[str, Any]:
    return {"checkpoint": str(checkpoint), "sha256": checkpoint_digest(checkpoint)}


def _data_info(**files: str | Path | None) -> dict[str, Any]:
    return {name: {"path": str(p), "sha256": sha256_file(p)} for name, p in files.items() if p is not None}


def _finish(
    out_dir: str | Path,
    results: list[TaskResult],
    checkpoint: str | Path,
    data: dict[str, Any],
    started: float,
    extra: dict[str, Any] | None = None,
) -> list[TaskResult]:
    write_results(
        out_dir, results, _model_info(checkpoint), data, {"seconds": time.time() - started, **(extra or {})}
    )
    return results


def eval_offline(
    checkpoint: str | Path,
    out_dir: str | Path = "runs/eval-offline",
    plot: bool = True,
    lm_weights: str = "float32",
    **settings: Any,
) -> list[TaskResult]:
    """`lm_weights`: how the frozen LM's linear weights are stored while measuring (float32, or
    the chat's bfloat16 / int8 storage); recorded in results.json."""
    from .offline import DATA_INFO, OfflineSettings, checkpoint_heldout_fraction, run_offline

    started = time.time()
    config = OfflineSettings(heldout_fraction=checkpoint_heldout_fraction(checkpoint), **settings)
    run = run_offline(Evaluator.load(checkpoint, lm_weights=lm_weights), config)
    extra: dict[str, Any] = {"settings": vars(config), "lm_weights": lm_weights}
    if plot and run.examples:
        from .plots import save_retrieval_examples

        extra["plot"] = str(save_retrieval_examples(Path(out_dir) / "examples.png", run.examples))
    return _finish(out_dir, run.results, checkpoint, DATA_INFO, started, extra)


def eval_vist(
    checkpoint: str | Path,
    data: str | Path,
    images: str | Path,
    out_dir: str | Path = "runs/eval-vist",
    text_field: str = "text",
) -> list[TaskResult]:
    from .formats import load_vist
    from .paper import evaluate_vist

    started = time.time()
    loaded = load_vist(data, images, text_field=text_field)
    result = evaluate_vist(Evaluator.load(checkpoint), loaded)
    return _finish(out_dir, [result], checkpoint, _data_info(story_in_sequence=data), started)


def eval_visdial(
    checkpoint: str | Path,
    data: str | Path,
    images: str | Path,
    out_dir: str | Path = "runs/eval-visdial",
    task: str = "visdial-retrieval",
    dense: str | Path | None = None,
    image_pattern: str | None = None,
) -> list[TaskResult]:
    """`image_pattern` (fields `{image_id}`, `{split}`) names the image files when they are not
    named as the official zips name them."""
    from .formats import load_visdial, load_visdial_dense
    from .paper import evaluate_visdial_answers, evaluate_visdial_retrieval

    started = time.time()
    loaded = load_visdial(data, images, image_pattern=image_pattern)
    ev = Evaluator.load(checkpoint)
    if task == "visdial-retrieval":
        result = evaluate_visdial_retrieval(ev, loaded)
    elif task == "visdial-answers":
        result = evaluate_visdial_answers(ev, loaded, load_visdial_dense(dense) if dense else None)
    else:
        raise ValueError(f"unknown VisDial task {task!r}: visdial-retrieval or visdial-answers")
    return _finish(out_dir, [result], checkpoint, _data_info(visdial=data, dense=dense), started)


def eval_collection(
    checkpoint: str | Path,
    data: str | Path,
    images: str | Path | None = None,
    out_dir: str | Path = "runs/eval-collection",
    captions: bool = True,
) -> list[TaskResult]:
    import json

    from .collection import evaluate_collection

    started = time.time()
    result, generated = evaluate_collection(Evaluator.load(checkpoint), data, images, captions)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if generated:
        (out / "captions.jsonl").write_text("".join(json.dumps(g) + "\n" for g in generated))
    return _finish(out_dir, [result], checkpoint, _data_info(collection=data), started)
