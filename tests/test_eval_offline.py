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
