from __future__ import annotations

import json

import pytest
import torch

from fromage.config import TrainConfig, apply_overrides, from_dict, load_json, save_json, to_dict
from fromage.data.readers import BadInputLog, TooManyBadInputs, read_jsonl, read_tsv
from fromage.metrics import group_recall_at_k, mean_reciprocal_rank, recall_at_k


def test_config_json_round_trip(tmp_path):
    config = apply_overrides(
        TrainConfig(), {"model.num-visual-tokens": "2", "lr": "1e-4", "data.sources": '["a.tsv"]'}
    )
    save_json(config, tmp_path / "c.json")
    again = load_json(TrainConfig, tmp_path / "c.json")
    assert to_dict(again) == to_dict(config)
    assert again.model.num_visual_tokens == 2 and again.lr == 1e-4 and again.data.sources == ["a.tsv"]


def test_config_rejects_typos_and_bad_values():
    with pytest.raises(ValueError, match="has no field 'lrr'"):
        apply_overrides(TrainConfig(), {"lrr": "1"})
    with pytest.raises(ValueError, match="expects int"):
        apply_overrides(TrainConfig(), {"max-steps": "many"})
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        from_dict(TrainConfig, {"nope": 1})
    with pytest.raises(ValueError, match="num_visual_tokens must be >= 1, got 0"):
        apply_overrides(TrainConfig(), {"model.num_visual_tokens": "0"})


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
