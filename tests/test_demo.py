"""The README's main command on the shipped model, for real (slow: builds the demo index)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_demo_checks_each_capability_and_writes_html(tmp_path):
    """Seven checked turns. The shipped model passes six with the chat's default settings (the
    story continuation fails; BENCHMARKS.md): this guards them, issue #15 wants all seven with
    memory on."""
    from fromage.apps.demo import run_demo
    from fromage.pipeline import RetrievedImage

    lines: list[str] = []
    report = run_demo(index_dir=tmp_path / "idx", html_path=tmp_path / "demo.html", echo=lines.append)
    printed = "\n".join(lines)
    assert len(report.checks) == 7 and report.passed >= 6, printed
    assert f"{report.passed}/7 checks passed" in printed
    assert "show me a red apple" in printed and "| red apple |" in printed
    retrieved = [i for t in report.transcript for i in t.items if isinstance(i, RetrievedImage)]
    user_images = sum(
        1 for t in report.transcript if t.role == "user" for i in t.items if not isinstance(i, str)
    )
    html = report.html.read_text()
    assert html.count('src="data:image/png;base64,') == user_images + len(retrieved)
