"""`fromage eval offline` on the shipped model, scaled down (slow: real backbones; still run by
`make test`). The full-size figures are in README.md and BENCHMARKS.md."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_offline_benchmark_writes_every_table_and_the_plot(tmp_path, capsys):
    from fromage.checkpoint import SHIPPED
    from fromage.evaluate.offline import OfflineSettings
    from fromage.evaluate.run import eval_offline

    results = eval_offline(
        SHIPPED,
        tmp_path,
        dialogue_queries=12,
        answer_images=4,
        stories=12,
        request_queries=8,
        captions=6,
    )
    names = [r.task for r in results]
    assert len(names) == 6 and any("story" in n for n in names) and any("answer" in n for n in names)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["tasks"]) == set(names)
    assert saved["settings"]["heldout_fraction"] == OfflineSettings().heldout_fraction
    assert saved["lm_weights"] == "float32"  # benchmark figures are exact unless asked otherwise
    story = next(r for r in results if "story" in r.task)
    assert [row.setting for row in story.rows if row.system == "fromage"] == [
        "1 caption",
        "5 captions",
        "5 captions + 4 images",
    ]
    assert story.metric("baseline", "5 captions + 4 images", "R@1") is not None
    assert story.metric("baseline", "1 caption", "R@1") is None
    dialogue = next(r for r in results if "dialogue" in r.task)
    assert dialogue.counts["queries"] == 12
    answers = next(r for r in results if "answer" in r.task)
    assert answers.counts["rounds"] == 12  # 4 images × 3 rounds
    for row in answers.rows:
        assert 0.0 <= row.metrics["R@1"] <= 1.0
    requests = next(r for r in results if "requests" in r.task)
    settings = {row.setting for row in requests.rows}
    assert "trained concepts: held-out forms after an unrelated turn" in settings
    assert requests.counts["queries_trained"] == 8
    captions = next(r for r in results if "captions" in r.task)
    assert len(captions.rows) == 4 and all(0.0 <= row.metrics["exact"] <= 1.0 for row in captions.rows)
    assert (tmp_path / "examples.png").stat().st_size > 10_000
    assert "### emoji cross-style retrieval" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_the_evaluator_measures_the_storage_the_chat_uses(kind):
    """`fromage eval offline --lm-weights int8` scores the model as the chat runs it: every linear
    layer of the LM stored that way, and decoding on the lean step."""
    from torch import nn

    from fromage.backbones.bf16_weights import BF16WeightLinear
    from fromage.backbones.int8_weights import Int8WeightLinear
    from fromage.checkpoint import SHIPPED
    from fromage.evaluate.engine import Evaluator

    model = Evaluator.load(SHIPPED, lm_weights=kind).model
    stored = BF16WeightLinear if kind == "bfloat16" else Int8WeightLinear
    layers = list(model.lm.model.modules())
    assert not any(isinstance(m, nn.Linear) for m in layers)
    assert sum(isinstance(m, stored) for m in layers) > 0
    assert model.lm.stepper is not None
    with pytest.raises(ValueError, match="int4"):
        Evaluator.load(SHIPPED, lm_weights="int4")
