import shutil
from pathlib import Path

import pytest
import torch

from fromage.apps.indexing import index_collection
from fromage.data.images import ImageError
from fromage.pipeline import Fromage, RetrievedImage

from .test_train import tiny_config, tiny_world  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def bot(tiny_world, tmp_path_factory):  # noqa: F811
    from fromage.training.loop import train

    root = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FROMAGE_HOME", str(root / "home"))
        result = train(tiny_config(tiny_world, root / "run", max_steps=2, refine_steps=0))
        photos = root / "photos"
        shutil.copytree(tiny_world / "images", photos, ignore=shutil.ignore_patterns("*.tsv"))
        index_collection(str(photos), result.checkpoint, root / "idx")
        # float32: these tests compare paths that must agree to 1e-4 (bf16 storage has its own tests).
        yield Fromage.from_pretrained(result.checkpoint, index=root / "idx", lm_weights="float32"), photos


def test_generate_interleaves_text_and_images_and_never_returns_context_images(bot):
    fromage, photos = bot
    first = sorted(photos.glob("*.png"))[0]
    answer = fromage.generate(
        ["red", first, "blue circle"], max_new_tokens=8, ret_scale_factor=1e6, min_word_tokens=1, max_rets=2
    )
    images = [p for p in answer if isinstance(p, RetrievedImage)]
    # Which words come out of a tiny random LM is arbitrary (its vocabulary is larger than the
    # test tokenizer's, so they may decode to nothing); the interleaving of word tokens and
    # [RET] is tested token by token in test_generate.py.
    assert len(images) == 2
    assert all(isinstance(p, (str, RetrievedImage)) for p in answer)
    assert all(Path(img.path) != first for img in images)  # the prompt's own image is excluded
    assert len({img.row for img in images}) == 2  # and no image twice in one answer


def test_stream_yields_the_same_answer_as_generate(bot):
    fromage, _ = bot
    kwargs = {"max_new_tokens": 10, "temperature": 0.8, "seed": 3, "ret_scale_factor": 50.0}
    streamed = list(fromage.stream(["a red"], **kwargs))
    whole = fromage.generate(["a red"], **kwargs)
    text_stream = "".join(p for p in streamed if isinstance(p, str))
    assert text_stream == "".join(p for p in whole if isinstance(p, str))


def test_retrieve_ranks_the_index_by_the_ret_embedding(bot):
    fromage, _ = bot
    found = fromage.retrieve(["a green square"], k=4)
    assert len(found) == 4 and [f.score for f in found] == sorted((f.score for f in found), reverse=True)
    # Brute force over every indexed embedding gives the same order.
    enc = fromage.encode(["a green square"])
    ids = torch.cat([enc.input_ids, torch.tensor([[fromage.model.ret_token_id]])], 1)
    with torch.no_grad():
        hidden = fromage.model(ids).ret_hidden[0, -1]
        query = fromage.model.text_embeddings(hidden[None]).numpy()
    scores = (query @ fromage.index.embeddings.T)[0]
    assert [f.row for f in found] == list(scores.argsort()[::-1][:4])


def test_score_is_the_shifted_log_likelihood_of_each_candidate(bot):
    fromage, photos = bot
    image = sorted(photos.glob("*.png"))[1]
    prompt = [image, "a"]
    got = fromage.score(prompt, ["red circle", "blue square"])
    for text, value in zip(["red circle", "blue square"], got, strict=True):
        enc = fromage.encode(prompt)
        cand = fromage.tokenizer(text, add_special_tokens=False)["input_ids"]
        total = 0.0
        for i, token in enumerate(cand):  # naive: one forward per candidate token
            ids = torch.cat([enc.input_ids, torch.tensor([cand[:i]], dtype=torch.long)], 1)
            with torch.no_grad():
                logits = fromage.model(ids, image_features=enc.image_features).logits[0, -1]
            total += float(torch.log_softmax(logits.float(), -1)[token])
        assert value == pytest.approx(total, abs=1e-4)


def test_caption_returns_text(bot):
    fromage, photos = bot
    assert isinstance(fromage.caption(sorted(photos.glob("*.png"))[0]), str)


def test_bad_prompts_get_clear_errors(bot, tmp_path):
    fromage, _ = bot
    with pytest.raises(ValueError, match="no text and no image"):
        fromage.generate([])
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="nope.png"):
        fromage.generate(["look", missing])
    with pytest.raises(TypeError, match="prompt items"):
        fromage.generate([42])  # type: ignore[list-item]
    no_index = Fromage(fromage.model, fromage.tokenizer)
    with pytest.raises(ValueError, match="needs an image index"):
        no_index.retrieve(["a red circle"])
    # Without an index, generation simply never asks for an image.
    answer = no_index.generate(["a red"], max_new_tokens=6, ret_scale_factor=1e6)
    assert not any(isinstance(p, RetrievedImage) for p in answer)


def test_cli_retrieve_and_caption(bot, capsys):
    from fromage.cli import main

    fromage, photos = bot
    checkpoint = Path(fromage.index.metadata[0]["path"]).parent.parent / "run" / "checkpoint"
    index_dir = photos.parent / "idx"
    image = sorted(photos.glob("*.png"))[0]
    assert (
        main(
            [
                "retrieve",
                "a red circle",
                "--image",
                str(image),
                "--model",
                str(checkpoint),
                "--index",
                str(index_dir),
                "-k",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    lines = out.rstrip("\n").split("\n")
    assert len(lines) == 2 and all(line.count("\t") == 2 for line in lines), out
    assert str(image) not in out  # the prompt's image is not retrieved
    assert main(["caption", str(image), "--model", str(checkpoint)]) == 0
    assert capsys.readouterr().out.startswith(str(image) + "\t")
    # The same with the LM's weights stored as int8 rows (issue #17).
    assert main(["caption", str(image), "--model", str(checkpoint), "--lm-weights", "int8"]) == 0
    assert capsys.readouterr().out.startswith(str(image) + "\t")


def test_split_at_stop_cuts_at_the_first_stop_and_holds_back_partial_ones():
    from fromage.pipeline import split_at_stop

    assert split_at_stop("red apple\nQ: more", ["\nQ:"]) == ("red apple", True)
    assert split_at_stop("red apple\nQ", ["\nQ:"]) == ("red apple", False)  # may still become "\nQ:"
    assert split_at_stop("a b", ["zz", "b"]) == ("a ", True)
    assert split_at_stop("abc", []) == ("abc", False)


def test_stop_strings_end_the_answer_before_them(bot):
    fromage, _ = bot
    kwargs = {"max_new_tokens": 12, "max_rets": 0, "temperature": 1.0, "seed": 0}
    full = ""
    while len(full) <= 4:  # a seed whose sample is long enough (the tiny LM often stops at once)
        kwargs["seed"] += 1
        full = "".join(p for p in fromage.generate(["a red"], **kwargs) if isinstance(p, str))
    stop = full[2:4]
    cut = full[: full.find(stop)]
    streamed = list(fromage.stream(["a red"], stop=(stop,), **kwargs))
    assert "".join(p for p in streamed if isinstance(p, str)) == cut
    assert fromage.generate(["a red"], stop=stop, **kwargs) == ([cut] if cut else [])


def test_images_per_ret_and_batched_calls_match_single_calls(bot):
    fromage, photos = bot
    answer = fromage.generate(["a red"], max_new_tokens=3, ret_scale_factor=1e6, images_per_ret=2)
    assert sum(isinstance(p, RetrievedImage) for p in answer) == 2
    images = sorted(photos.glob("*.png"))
    prompts = [["a green square"], ["red", images[0]], [images[1], "blue", images[2], "circle"]]
    batched = fromage.retrieve_batch(prompts, k=3)
    for prompt, got in zip(prompts, batched, strict=True):
        alone = fromage.retrieve(prompt, k=3)
        assert [g.row for g in got] == [a.row for a in alone]
        assert [g.score for g in got] == pytest.approx([a.score for a in alone], abs=1e-4)
    assert fromage.caption_batch(images[:3]) == [fromage.caption(i) for i in images[:3]]
    gen = fromage.generate_batch([["a red"], ["blue"]], max_new_tokens=4)
    assert gen == [
        fromage.generate(["a red"], max_new_tokens=4),
        fromage.generate(["blue"], max_new_tokens=4),
    ]


def test_cli_caption_goes_on_past_an_unreadable_image(bot, tmp_path, capsys):
    """Issue #18 item 9: `fromage caption A B C` stopped at the first missing file."""
    from fromage.cli import main

    fromage, photos = bot
    checkpoint = Path(fromage.index.metadata[0]["path"]).parent.parent / "run" / "checkpoint"
    first, second = sorted(photos.glob("*.png"))[:2]
    missing = tmp_path / "missing.png"
    assert main(["caption", str(first), str(missing), str(second), "--model", str(checkpoint)]) == 1
    captured = capsys.readouterr()
    assert [line.split("\t")[0] for line in captured.out.splitlines()] == [str(first), str(second)]
    assert "missing.png" in captured.err and "Traceback" not in captured.err


def test_complete_says_why_the_answer_ended(bot):
    """ "length" when max_new_tokens cut the answer, "stop" at a stop string."""
    fromage, _ = bot
    answer, ending = fromage.complete(["a red"], max_new_tokens=3, max_rets=0)
    text = "".join(p for p in answer if isinstance(p, str))
    assert ending.reason == "length" and ending.tokens == 3
    if text.strip():
        stop = text.strip()[0]
        stopped, ending = fromage.complete(["a red"], max_new_tokens=3, max_rets=0, stop=(stop,))
        assert ending.reason == "stop" and stop not in "".join(p for p in stopped if isinstance(p, str))


def test_cli_retrieve_and_caption_batch_many_inputs_and_print_json(bot, capsys):
    """Issue #16: one model load for many queries or images, and `--json` output; the JSON
    agrees with the Python API."""
    import json

    from fromage.cli import main

    fromage, photos = bot
    checkpoint = Path(fromage.index.metadata[0]["path"]).parent.parent / "run" / "checkpoint"
    index_dir = photos.parent / "idx"
    args = ["--model", str(checkpoint), "--index", str(index_dir), "-k", "2", "--json"]
    assert main(["retrieve", "a red circle", "a blue square", *args]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in results] == ["a red circle", "a blue square"]
    expected = fromage.retrieve_batch([["a red circle"], ["a blue square"]], k=2)
    for result, hits in zip(results, expected, strict=True):
        assert [i["path"] for i in result["images"]] == [h.path for h in hits]
    images = [str(p) for p in sorted(photos.glob("*.png"))[:3]]
    # The fixture keeps float32 weights; the CLI's default storage (int8) rounds them.
    assert main(["caption", *images, "--model", str(checkpoint), "--json", "--lm-weights", "float32"]) == 0
    captions = json.loads(capsys.readouterr().out)
    assert [c["image"] for c in captions] == images
    assert [c["caption"] for c in captions] == [fromage.caption(Path(p)) for p in images]


def test_every_command_defaults_to_the_shipped_model():
    from fromage.checkpoint import SHIPPED
    from fromage.cli import _model, build_parser

    parser = build_parser()
    for argv in (["index", "emoji-google", "--out", "x"], ["retrieve", "a"], ["caption", "a.png"], ["chat"]):
        assert _model(parser.parse_args(argv)) == str(SHIPPED), argv
    assert _model(parser.parse_args(["caption", "a.png", "--model", "default"])) == str(SHIPPED)
    assert _model(parser.parse_args(["features", "emoji-google", "--checkpoint", "ck"])) == "ck"


def test_stream_batch_gives_each_row_what_stream_gives_it_alone(bot):
    """Issue #17: rows decoded together (one forward per step) get their own text, their own
    retrievals at their own `[RET]`s, their own stop strings and endings, row for row as alone."""
    from fromage.pipeline import Ending

    fromage, photos = bot
    images = sorted(photos.glob("*.png"))
    prompts = [["a red"], ["blue", images[0], "circle"], [images[1], "a long green square prompt", images[2]]]
    for kwargs in (
        {"max_new_tokens": 8, "ret_scale_factor": 1e3, "min_word_tokens": 1, "max_rets": 2},
        {"max_new_tokens": 8, "temperature": 1.0, "ret_scale_factor": 20.0, "stop": ("e",)},
    ):
        seeds = [11, 12, 13]
        alone = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            gen = fromage.stream(prompt, seed=seed, **kwargs)
            pieces = []
            while True:
                try:
                    pieces.append(next(gen))
                except StopIteration as end:
                    pieces.append(end.value)
                    break
            alone.append(pieces)
        batched: list[list] = [[] for _ in prompts]
        for row, piece in fromage.stream_batch(prompts, seeds, **kwargs):
            batched[row].append(piece)
        for b, a in zip(batched, alone, strict=True):
            assert isinstance(b[-1], Ending) and b[-1] == a[-1]
            assert "".join(p for p in b if isinstance(p, str)) == "".join(p for p in a if isinstance(p, str))
            got = [[i.row for i in p] for p in b if isinstance(p, list)]
            assert got == [[i.row for i in p] for p in a if isinstance(p, list)]
        if "stop" not in kwargs:  # the [RET]-heavy settings retrieved in every row
            assert all(any(isinstance(p, list) for p in row) for row in batched)


def test_a_stop_string_completed_by_the_last_allowed_token_ends_the_row_once(bot):
    """The row's stop string and its token budget end it at the same step: one Ending ("stop")."""
    from fromage.pipeline import Ending

    fromage, _ = bot
    kwargs = {"max_new_tokens": 6, "max_rets": 0, "temperature": 1.0}
    seed, full = 0, ""
    while len(full) <= 2:  # a seed whose sample has some text (the tiny LM often stops at once)
        seed += 1
        answer, _ = fromage.complete(["a red"], seed=seed, **kwargs)
        full = "".join(p for p in answer if isinstance(p, str))
    _, stopped = fromage.complete(["a red"], seed=seed, stop=(full,), **kwargs)
    assert stopped.reason == "stop"
    # The budget is exactly the tokens that complete the stop string.
    kwargs["max_new_tokens"] = stopped.tokens
    events = list(fromage.stream_batch([["a red"], ["blue"]], [seed, seed], stop=(full,), **kwargs))
    endings = [(row, p) for row, p in events if isinstance(p, Ending)]
    assert sorted(row for row, _ in endings) == [0, 1]
    assert dict(endings)[0] == Ending("stop", stopped.tokens)
    assert "".join(p for row, p in events if row == 0 and isinstance(p, str)) == ""
