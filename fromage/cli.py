"""`fromage …` commands. Thin: each subcommand parses arguments and calls a library function."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

from .config import (
    FEATURE_BATCH_SIZE,
    MAX_BAD_FRACTION,
    WEIGHT_STORAGES,
    ChatConfig,
    TrainConfig,
    load_json,
    to_dict,
)
from .training.recipes import RECIPES, recipe

S = TypeVar("S")


def settings(cls: type[S], default: S, args: argparse.Namespace, extra: Sequence[str], about: str) -> S:
    """A settings dataclass from the flags left after the command's own: tyro makes them (and
    their help) from the class's fields and docstrings, so each setting is described and given
    its default once, where it is defined. A bad setting exits 2 with tyro's message."""
    import tyro

    flags = list(extra)
    given = [f.split("=", 1)[0].replace("_", "-") for f in flags if f.startswith("--")]
    repeated = sorted({f for f in given if given.count(f) > 1})
    if repeated:
        # tyro would keep the last one silently; a list setting takes its values after one flag.
        raise ValueError(f"{', '.join(repeated)} given more than once; give several values after one flag")
    if args.help:
        args.parser.print_help()
        print()
        flags = ["--help"]
    if args.config:  # a file of settings (what --print-config writes) replaces the defaults
        default = load_json(cls, args.config)
    return tyro.cli(cls, default=default, args=flags, prog=f"fromage {args.command}", description=about)


def _printed(config: Any, args: argparse.Namespace) -> bool:
    """With --print-config: print the settings as JSON (a file for --config) → True."""
    if args.print_config:
        print(json.dumps(to_dict(config), indent=2))
    return bool(args.print_config)


def train_config(args: argparse.Namespace, extra: Sequence[str]) -> TrainConfig:
    """The run's settings: a recipe (`--recipe`) or a config file (`--config`, e.g. a run's
    `train_config.json` or what `--print-config` wrote), then any `--key value` after them,
    nested groups as `--model.key`, `--data.key`, `--tasks.key`."""
    where = f"--config {args.config}" if args.config else f"--recipe {args.recipe}"
    # --out is the one name for "where results go" in every command.
    flags = [_renamed(a, "--out", "--output-dir") for a in extra]
    return settings(
        TrainConfig,
        recipe(args.recipe),
        args,
        flags,
        f"Settings of the run (defaults: {where}); set any as --key value.",
    )


def _renamed(flag: str, old: str, new: str) -> str:
    """`--out` → `--output-dir`, `--out=x` → `--output-dir=x`; anything else unchanged."""
    if flag == old or flag.startswith(old + "="):
        return new + flag[len(old) :]
    return flag


def cmd_train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    config = train_config(args, extra)
    if _printed(config, args):
        return 0
    if config.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        from .training.distributed import launch

        launch(_train_and_report, (config,), config.num_processes)
    else:  # one process, or one of the processes `accelerate launch` / torchrun started
        _train_and_report(config)
    return 0


def _train_and_report(config: TrainConfig) -> None:
    from .training.loop import train

    result = train(config)
    if not result.is_main:
        return  # the main process reports
    print(f"checkpoint: {result.checkpoint}")
    print(f"steps: {result.step}  samples/s: {result.samples_per_second:.1f}")
    print(f"trainable parameters: {result.trainable_parameters:,}")
    print(f"peak resident memory: {result.peak_rss_mb:.0f} MB")
    print(f"data: {result.bad_inputs}")
    print(json.dumps(result.metrics, indent=2, sort_keys=True))


def cmd_fetch(args: argparse.Namespace) -> int:
    """Fetch and prepare the offline assets once: emoji images (npm) and SmolLM2 (GGUF → safetensors)."""
    from .backbones import embedded_lm_dir
    from .data.builtin import EMOJI_STYLES, emoji_dir

    for style in EMOJI_STYLES:
        print(f"emoji ({style}): {emoji_dir(style)}")
    print(f"SmolLM2-135M: {embedded_lm_dir()}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """Embed a collection into a checkpoint's retrieval space; re-runs add only new images."""
    from .apps.indexing import index_collection

    report = index_collection(
        args.source,
        _model(args),
        args.out,
        image_dir=args.image_dir,
        index_type=args.index_type,
        max_bad_fraction=args.max_bad_fraction,
        device=args.device,
    )
    print(f"index: {report.directory} ({report.total} images; type {args.index_type})")
    print(f"added {report.added}, already indexed {report.skipped}; {report.bad}")
    if report.recall is not None:  # approximate indexes measure what they trade for speed
        r = report.recall
        print(f"recall@{r['k']:g} vs exact search: {r['recall']:.3f} ({r['queries']:g} rows as queries)")
    print(f"{report.seconds:.1f} s, {report.images_per_second:.1f} images/s")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    """Run the frozen image encoder over a collection into the shared feature cache."""
    from .apps.features import extract_collection
    from .checkpoint import load_encoder_config
    from .config import EncoderConfig

    if args.encoder:
        encoder = EncoderConfig(name=args.encoder, image_size=args.image_size or 224)
    else:
        encoder = load_encoder_config(_model(args))
        if args.image_size:
            encoder = EncoderConfig(name=encoder.name, image_size=args.image_size)
    report = extract_collection(
        args.source,
        encoder,
        num_processes=args.num_processes,
        batch_size=args.batch_size,
        views=args.views,
        image_dir=args.image_dir,
        max_bad_fraction=args.max_bad_fraction,
        device=args.device,
    )
    print(f"features: {report.cache_dir} (encoder {report.encoder_id}; workers: {report.processes})")
    print(f"images {report.images}; (image, view) features encoded {report.encoded}, cached {report.cached}")
    print(f"bad inputs: {report.bad.summary()}")
    print(f"{report.seconds:.1f} s, {report.images_per_second:.1f} images/s encoded")
    return 0


def _prompt(texts: Sequence[str], images: Sequence[str]) -> list:
    from pathlib import Path

    return [*texts, *(Path(p) for p in images)]


def cmd_retrieve(args: argparse.Namespace) -> int:
    """Each text (with the `--image`s) + `[RET]` → the k best images; one model load for all."""
    from .pipeline import Fromage

    if not args.texts and not args.image:
        raise ValueError("give a text, an --image, or both")
    model = _model(args)
    index = args.index
    if index is None:  # the Google emoji index of this model, built once under FROMAGE_HOME
        from .apps.demo import emoji_index

        index = emoji_index(model, echo=lambda line: print(line, file=sys.stderr))
    bot = Fromage.from_pretrained(model, index=index, device=args.device, lm_weights=args.lm_weights)
    queries = args.texts or [""]
    found = bot.retrieve_batch([_prompt([t] if t else [], args.image) for t in queries], k=args.k)
    if args.json:
        results = [
            {"query": q, "images": [{"path": f.path, "caption": f.caption, "score": f.score} for f in hits]}
            for q, hits in zip(queries, found, strict=True)
        ]
        print(json.dumps(results if len(queries) > 1 else results[0], indent=2))
        return 0
    for q, hits in zip(queries, found, strict=True):
        for f in hits:
            print(
                f"{q}\t{f.score:.3f}\t{f.path}\t{f.caption}"
                if len(queries) > 1
                else f"{f.score:.3f}\t{f.path}\t{f.caption}"
            )
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    """Greedy captions of every image, in batches of one model load; an unreadable image is
    reported and the others are still captioned (exit code 1 then)."""
    from .data.images import ImageError, load_image
    from .pipeline import Fromage

    bot = Fromage.from_pretrained(_model(args), device=args.device, lm_weights=args.lm_weights)
    readable, images, failed = [], [], 0
    for path in args.images:
        try:
            images.append(load_image(path))
            readable.append(path)
        except ImageError as error:
            print(f"fromage caption: {error}", file=sys.stderr)
            failed += 1
    captions = bot.caption_batch(images) if images else []
    if args.json:
        print(
            json.dumps(
                [{"image": p, "caption": c} for p, c in zip(readable, captions, strict=True)], indent=2
            )
        )
    else:
        for path, caption in zip(readable, captions, strict=True):
            print(f"{path}\t{caption}")
    return 1 if failed else 0


def cmd_chat(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Interactive dialogue on stdin: `@path` attaches an image; /save FILE, /reset, /quit."""
    from .apps.chat import run_terminal
    from .pipeline import Fromage

    config = settings(ChatConfig, ChatConfig(), args, extra, "Answer settings; set any as --key value.")
    if _printed(config, args):
        return 0
    bot = Fromage.from_pretrained(
        _model(args), index=args.index, device=args.device, lm_weights=args.lm_weights
    )
    run_terminal(bot, config, save=args.save)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .apps.demo import CHAT, run_demo

    report = run_demo(_model(args), args.index, args.save, chat=dataclasses.replace(CHAT, memory=args.memory))
    return 0 if report.passed == len(report.checks) or not args.check else 1


def cmd_serve(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from .apps.serve import serve
    from .config import ServeConfig

    config = settings(ServeConfig, ServeConfig(), args, extra, "Server limits; set any as --key value.")
    if _printed(config, args):
        return 0
    # The key from the environment keeps it out of the process list (`ps` shows flags).
    config.api_key = config.api_key or os.environ.get("FROMAGE_API_KEY", "")
    serve(_model(args), args.index, args.host, args.port, config)
    return 0


def cmd_demo_web(args: argparse.Namespace) -> int:
    from .apps.demo import emoji_index
    from .apps.webui import launch

    checkpoint = _model(args)
    index = args.index or emoji_index(checkpoint)
    launch(checkpoint, index, args.host, args.port)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import run

    model = _model(args)
    out = args.out or f"runs/eval-{args.task}"
    needs_data = args.task != "offline"
    if needs_data and not args.data:
        raise SystemExit(f"fromage eval {args.task}: --data FILE is required (see docs/evaluation.md)")
    if args.task in ("vist", "visdial-retrieval", "visdial-answers") and not args.images:
        raise SystemExit(f"fromage eval {args.task}: --images DIR is required (see docs/evaluation.md)")
    if args.task == "offline":
        results = run.eval_offline(model, out, lm_weights=args.lm_weights)
    elif args.task == "vist":
        results = run.eval_vist(model, args.data, args.images, out, text_field=args.vist_text_field)
    elif args.task.startswith("visdial"):
        results = run.eval_visdial(
            model,
            args.data,
            args.images,
            out,
            task=args.task,
            dense=args.dense,
            image_pattern=args.image_pattern,
        )
    else:
        results = run.eval_collection(model, args.data, args.images, out, captions=not args.no_captions)
    if args.task == "offline":
        from .evaluate.report import summary_table

        print(summary_table(results), end="\n\n")
    else:
        for result in results:
            print(result.table(), end="\n\n")
    print(f"results: {out}/results.json, {out}/results.md (every metric, counts, notes)")
    return 0


SETTINGS_COMMANDS = {"train": cmd_train, "chat": cmd_chat, "serve": cmd_serve}
"""Commands whose settings dataclass takes the flags they do not know themselves."""


def _settings_flags(p: argparse.ArgumentParser) -> None:
    """A command whose settings dataclass takes the flags it does not know (`settings`): its
    -h shows its own flags, then every setting."""
    p.add_argument("-h", "--help", action="store_true", help="show this help, then every setting, and exit")
    p.add_argument("--config", help="JSON file of the settings (flags after it still apply)")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resulting settings as JSON (a file for --config) and exit",
    )
    p.set_defaults(parser=p)


def build_parser() -> argparse.ArgumentParser:
    # No prefix abbreviations: `--max-images` must not silently mean `--max-images-per-request`.
    parser = argparse.ArgumentParser(
        prog="fromage", description="FROMAGe: frozen LMs grounded to images.", allow_abbrev=False
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log at INFO level (and show tracebacks)"
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fromage {__version__}")
    # -v works after the subcommand too (`fromage train -v`): each subparser shares it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    subparsers = parser.add_subparsers(dest="command", required=True)

    class _Sub:
        def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
            # Commands with a settings dataclass print its help after their own (`_settings_flags`).
            own_help = name not in SETTINGS_COMMANDS
            return subparsers.add_parser(
                name, parents=[common], allow_abbrev=False, add_help=own_help, **kwargs
            )

    sub = _Sub()
    p = sub.add_parser(
        "train",
        help="train the maps and [RET] (default: the offline emoji + easy-VQA recipe)",
        description="Train FROMAGe. Any setting can follow as --key value, e.g. --max-steps 100 "
        "--model.num-visual-tokens 1 --data.sources data.tsv more.tsv (--out DIR is --output-dir); "
        "the settings are listed below.",
    )
    _settings_flags(p)
    p.add_argument(
        "--recipe",
        default="quick",
        choices=list(RECIPES),
        help="quick: ≤ 15 min on 2 CPU cores (make train); ship, then ship-continue: the shipped "
        "weights' two stages, hours on 2 cores, minutes on a GPU, run directories under "
        "FROMAGE_HOME/runs; re-running one resumes it",
    )
    sub.add_parser("fetch", help="fetch the offline assets (emoji images, SmolLM2 conversion) once")
    p = sub.add_parser(
        "index",
        help="embed an image collection for retrieval (re-runs add only new images)",
        description="SOURCE: a folder of images, a .tsv (caption<TAB>image) or .jsonl file, "
        "webdataset tar shards (data/{00000..00099}.tar), or a built-in set: emoji-google, "
        "emoji-twitter, easyvqa-train, easyvqa-test.",
    )
    p.add_argument("source")
    p.add_argument(
        "--model", default=None, help="checkpoint directory, or `default` (the shipped model, the default)"
    )
    p.add_argument("--out", required=True, help="index directory to create or grow")
    p.add_argument(
        "--index-type",
        default="auto",
        choices=["auto", "flat", "hnsw", "ivf", "ivfpq"],
        help="auto: flat up to 100k images, hnsw up to 1M, ivfpq above (docs/scale.md)",
    )
    p.add_argument("--image-dir", default=None, help="where relative image paths of a TSV/JSONL resolve")
    p.add_argument("--max-bad-fraction", type=float, default=MAX_BAD_FRACTION)
    p.add_argument("--device", default="cpu")
    p = sub.add_parser(
        "features",
        help="encode a collection's images once into the feature cache that train and index read",
        description="SOURCE: webdataset tar shards (data/{00000..00099}.tar or data/*.tar), a folder "
        "of images, a .tsv/.jsonl file, or a built-in set (as for `fromage index`). Worker r of "
        "--num-processes N takes shards (or images) r::N; each writes its own cache shards.",
    )
    p.add_argument("source")
    p.add_argument(
        "--model",
        "--checkpoint",
        dest="model",
        default=None,
        help="use its encoder (default: the shipped model)",
    )
    p.add_argument("--encoder", default=None, help="or an encoder name: efficientnet-lite0, an HF model")
    p.add_argument("--image-size", type=int, default=0, help="encoder input side (default: the checkpoint's)")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=FEATURE_BATCH_SIZE)
    p.add_argument("--views", type=int, default=0, help="augmented views too (training's data.augment_views)")
    p.add_argument("--image-dir", default=None, help="where relative image paths of a TSV/JSONL resolve")
    p.add_argument("--max-bad-fraction", type=float, default=MAX_BAD_FRACTION)
    p.add_argument("--device", default="cpu", help="cpu, cuda (workers spread over GPUs), cuda:N")
    p = sub.add_parser("retrieve", help="text and/or images + [RET] → the best images of an index")
    p.add_argument("texts", nargs="*", help="queries (each with the --image prompts); one model load for all")
    p.add_argument("--image", action="append", default=[], help="an image for the prompt (repeatable)")
    p.add_argument(
        "--model", default=None, help="checkpoint directory, or `default` (the shipped model, the default)"
    )
    p.add_argument(
        "--index",
        default=None,
        help="index directory built by `fromage index` (default: the Google emoji index)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tab-separated lines")
    p.add_argument("-k", type=_positive, default=3, help="images to return (at least 1)")
    p.add_argument("--device", default="cpu")
    _lm_weights_flag(p)
    p = sub.add_parser("caption", help="greedy captions of images")
    p.add_argument("images", nargs="+")
    p.add_argument("--json", action="store_true", help="print JSON instead of tab-separated lines")
    p.add_argument(
        "--model", default=None, help="checkpoint directory, or `default` (the shipped model, the default)"
    )
    p.add_argument("--device", default="cpu")
    _lm_weights_flag(p)
    p = sub.add_parser(
        "chat",
        help="interactive dialogue: text and @image in, text and retrieved images out",
        description='Type a message per line; @path (or @"path with spaces") attaches an image '
        "where it appears. /save FILE writes the conversation as HTML, /reset forgets it, /quit ends.",
    )
    p.add_argument(
        "--model", default=None, help="checkpoint directory, or `default` (the shipped model, the default)"
    )
    p.add_argument("--index", default=None, help="index directory (without one, answers are text only)")
    p.add_argument(
        "--out", "--save", dest="save", default="", help="write the transcript as HTML here at the end"
    )
    p.add_argument("--device", default="cpu")
    _lm_weights_flag(p)
    _settings_flags(p)
    p = sub.add_parser("serve", help="HTTP API (OpenAI-style chat completions, retrieve, caption)")
    p.add_argument(
        "--model", default=None, help="checkpoint directory, or `default` (the shipped model, the default)"
    )
    p.add_argument("--index", default=None, help="index directory built by `fromage index`")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    _settings_flags(p)
    p = sub.add_parser("demo-web", help="web chat (Gradio) on the shipped model and emoji index")
    p.add_argument(
        "--model", default=None, help="checkpoint directory, or `default` (the shipped model, the default)"
    )
    p.add_argument("--index", default=None, help="index directory (default: the Google emoji index)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p = sub.add_parser(
        "eval",
        help="benchmarks: offline (no download), vist, visdial-retrieval, visdial-answers, collection",
        description="Writes results.json and results.md (and examples.png for offline) under --out. "
        "File layouts for vist and visdial-*: docs/evaluation.md.",
    )
    p.add_argument("task", choices=["offline", "vist", "visdial-retrieval", "visdial-answers", "collection"])
    p.add_argument(
        "--model", default=None, help="checkpoint directory, or `default` (the shipped model, the default)"
    )
    p.add_argument("--data", default=None, help="the benchmark's annotation file (JSON, TSV or JSONL)")
    p.add_argument("--images", default=None, help="directory of the benchmark's images")
    p.add_argument("--dense", default=None, help="VisDial dense annotations (NDCG) for visdial-answers")
    p.add_argument("--vist-text-field", default="text", choices=["text", "original_text"])
    p.add_argument(
        "--image-pattern",
        default=None,
        help="VisDial image file names, e.g. '{image_id}.jpg' (fields {image_id}, {split}); default: "
        "the official names (VisualDialog_val2018_000000000001.jpg, COCO_train2014_…)",
    )
    p.add_argument("--no-captions", action="store_true", help="collection: skip greedy captioning")
    p.add_argument(
        "--lm-weights",
        default="float32",
        choices=WEIGHT_STORAGES,
        help="offline: store the frozen LM's linear weights as the chat does (default float32, exact)",
    )
    p.add_argument("--out", default=None, help="output directory (default: runs/eval-TASK)")
    p = sub.add_parser("demo", help="the shipped model in a scripted conversation (prints it, writes HTML)")
    p.add_argument(
        "--model", default=None, help="checkpoint directory, or `default` (the shipped model, the default)"
    )
    p.add_argument("--index", default=None, help="index directory (default: under FROMAGE_HOME)")
    p.add_argument(
        "--out",
        "--save",
        dest="save",
        default="demo_transcript.html",
        help="where to write the HTML transcript",
    )
    p.add_argument("--check", action="store_true", help="exit 1 unless every check passes")
    p.add_argument(
        "--memory",
        type=int,
        default=ChatConfig.memory,
        help="earlier exchanges in each prompt (-1: all that fit; default: the chat's default)",
    )
    return parser


def _lm_weights_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lm-weights",
        default="int8",
        choices=WEIGHT_STORAGES,
        help="storage of the frozen LM's linear weights: int8 is the fastest single stream "
        "(weights rounded to 8 bits), bfloat16 ~1.5x slower, float32 exact and slowest "
        "(default: int8)",
    )


def _model(args: argparse.Namespace) -> str:
    """The checkpoint a command uses: `--model DIR`, or the shipped model (no `--model`, or
    `--model default`), which works from any directory."""
    from .checkpoint import SHIPPED

    return str(SHIPPED) if args.model in (None, "default") else args.model


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command. Errors in what the user gave (a missing file, a damaged checkpoint or
    index) print one line naming the problem and exit 1; `-v` shows the traceback. A flag or
    setting that cannot be parsed exits 2 with the parser's message, as argparse does."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        # Log lines go through tqdm, so they print above a progress bar instead of through it.
        with logging_redirect_tqdm():
            return _run(parser, args, extra)
    except KeyboardInterrupt:
        print("fromage: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:
        if args.verbose:
            raise
        print(f"fromage {args.command}: error: {error}", file=sys.stderr)
        return 1


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: Sequence[str]) -> int:
    if args.command in SETTINGS_COMMANDS:
        return SETTINGS_COMMANDS[args.command](args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    commands = {
        "fetch": cmd_fetch,
        "index": cmd_index,
        "features": cmd_features,
        "retrieve": cmd_retrieve,
        "caption": cmd_caption,
        "demo": cmd_demo,
        "demo-web": cmd_demo_web,
        "eval": cmd_eval,
    }
    if args.command in commands:
        return commands[args.command](args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
