"""The README's main command on the shipped model, for real (slow: builds the demo index)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_demo_passes_every_check_with_memory_on_and_writes_html(tmp_path):
    from fromage.apps.demo import CHAT, run_demo
    from fromage.pipeline import RetrievedImage

    assert CHAT.memory == -1  # every earlier turn in each prompt
    lines: list[str] = []
    report = run_demo(index_dir=tmp_path / "idx", html_path=tmp_path / "demo.html", echo=lines.append)
    printed = "\n".join(lines)
    assert report.passed == len(report.checks) == 8, printed
    assert f"{len(report.checks)}/{len(report.checks)} checks passed" in printed
    assert "show me a red apple" in printed and "| red apple |" in printed
    retrieved = [i for t in report.transcript for i in t.items if isinstance(i, RetrievedImage)]
    user_images = sum(
        1 for t in report.transcript if t.role == "user" for i in t.items if not isinstance(i, str)
    )
    html = report.html.read_text()
    assert html.count('src="data:image/png;base64,') == user_images + len(retrieved)
