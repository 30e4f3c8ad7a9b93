from __future__ import annotations

import json

import pytest
import torch

from fromage.config import TrainConfig, from_dict, load_json, save_json, to_dict
from fromage.data.readers import BadInputLog, TooManyBadInputs, read_jsonl, read_tsv
from fromage.metrics import group_recall_at_k, mean_reciprocal_rank, recall_at_k


def _settings(*flags: str, recipe: str = "quick", config: str | None = None) -> TrainConfig:
    """What `fromage train … --print-config` would print, as a TrainConfig."""
    import argparse

    from fromage.cli import train_config

    args = argparse.Namespace(command="train", recipe=recipe, config=config, help=False)
    return train_config(args, list(flags))


def test_config_json_round_trip(tmp_path):
    config = _settings("--model.num-visual-tokens", "2", "--lr", "1e-4", "--data.sources", "a.tsv")
    save_json(config, tmp_path / "c.json")
    again = load_json(TrainConfig, tmp_path / "c.json")
    assert to_dict(again) == to_dict(config)
    assert again.model.num_visual_tokens == 2 and again.lr == 1e-4 and again.data.sources == ["a.tsv"]
    # A config file is the starting point; flags after it still apply.
    later = _settings("--max-steps", "9", config=str(tmp_path / "c.json"))
    assert later.model.num_visual_tokens == 2 and later.max_steps == 9


def test_settings_start_from_the_recipe_and_take_every_flag_form():
    ship = _settings("--out", "elsewhere", "--data.sources", "a.tsv", "b.tsv", "--no-resume", recipe="ship")
    assert ship.max_steps == 4000 and ship.output_dir == "elsewhere" and ship.resume is False
    assert ship.data.sources == ["a.tsv", "b.tsv"] and ship.tasks.batch_size == 32
    assert _settings("--max_steps=3", "--tasks.story", "0.5").max_steps == 3  # underscores, =value


def test_config_rejects_typos_and_bad_values(capsys):
    with pytest.raises(SystemExit):
        _settings("--lrr", "1")
    assert "--lrr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _settings("--max-steps", "many")
    assert "many" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        from_dict(TrainConfig, {"nope": 1})
    with pytest.raises(SystemExit):
        _settings("--model.num-visual-tokens", "0")
    assert "num_visual_tokens must be >= 1, got 0" in capsys.readouterr().err


def test_print_config_writes_a_file_that_config_reads(tmp_path, capsys):
    from fromage.cli import main

    assert main(["train", "--recipe", "ship", "--print-config", "--max-steps", "5"]) == 0
    (tmp_path / "c.json").write_text(capsys.readouterr().out)
    again = load_json(TrainConfig, tmp_path / "c.json")
    assert again.max_steps == 5 and again.tasks.batch_size == 32 and not (tmp_path / "runs").exists()


def test_train_help_lists_every_setting_with_its_docstring(capsys):
    import dataclasses

    from fromage.cli import main
    from fromage.config import DataConfig, ModelConfig, TaskMix

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--print-config" in text and "--recipe" in text
    for prefix, cls in (
        ("", TrainConfig),
        ("model.", ModelConfig),
        ("data.", DataConfig),
        ("tasks.", TaskMix),
    ):
        for field in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(getattr(cls(), field.name)):
                assert "--" + (prefix + field.name).replace("_", "-") in text, field.name
    assert "Wall-time budget of the whole run" in " ".join(text.split())


def test_tsv_reader_reports_file_and_line(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_bytes(
        "\ufeffcaption\timage\r\n".encode()
        + b"a cat\tcat.png\r\n"
        + b"bad \xff line\tx.png\n"
        + b"one field only\n"
        + b"tab\tin\tcaption\n"
        + b"a dog\tdog.png\n"
    )
    bad = BadInputLog()
    rows = read_tsv(path, None, bad)
    assert [(r.caption, r.image.split("/")[-1]) for r in rows] == [("a cat", "cat.png"), ("a dog", "dog.png")]
    assert bad.counts == {"not utf-8": 1, "malformed row": 2}
    assert any("d.tsv:3" in m for m in bad.messages) and any("d.tsv:4" in m for m in bad.messages)
    with pytest.raises(TooManyBadInputs, match="3 of 5 inputs are bad"):
        bad.check(5, 0.01)


def test_jsonl_reader(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [
        json.dumps({"image": "a.png", "caption": "an apple"}),
        "{not json",
        json.dumps([1]),
        json.dumps({"image": "b.png"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    bad = BadInputLog()
    rows = read_jsonl(path, tmp_path / "imgs", bad)
    assert len(rows) == 1 and rows[0].image == str(tmp_path / "imgs" / "a.png")
    assert bad.total == 3


def test_recall_counts_ties_against_the_model():
    scores = torch.tensor([[0.9, 0.5, 0.5], [0.2, 0.2, 0.2], [0.1, 0.3, 0.2]])
    targets = torch.tensor([0, 1, 2])
    # ranks: 0; tie with two others → 2; one higher → 1
    assert recall_at_k(scores, targets, ks=(1, 2, 3)) == pytest.approx(
        {"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0}
    )
    assert mean_reciprocal_rank(scores, targets) == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)


def test_group_recall_accepts_any_item_of_the_group():
    scores = torch.tensor([[0.1, 0.9, 0.8], [0.7, 0.9, 0.1]])
    # query 0 is "red": gallery items 0 and 2 are red; item 2 ranks second → R@1 0, R@2 1
    got = group_recall_at_k(scores, ["red", "blue"], ["red", "blue", "red"], ks=(1, 2))
    assert got == {"R@1": 0.5, "R@2": 1.0}


def test_tokenize_no_captions_is_empty():
    from fromage.tokens import tokenize_captions

    assert tokenize_captions(object(), [], 8) == []


def test_file_validation_rows_do_not_depend_on_where_the_file_lives(tmp_path):
    from fromage.config import DataConfig
    from fromage.data.dataset import build_examples

    lines = ["caption\timage"] + [f"thing {i}\timg{i}.png" for i in range(400)]
    held = []
    for where in ("a", "b/c"):
        (tmp_path / where).mkdir(parents=True)
        (tmp_path / where / "d.tsv").write_text("\n".join(lines) + "\n")
        _, val = build_examples(DataConfig(sources=[str(tmp_path / where / "d.tsv")]), BadInputLog())
        held.append([e.caption for e in val.get("d", [])])
    assert held[0] == held[1] and 0 < len(held[0]) < 20
