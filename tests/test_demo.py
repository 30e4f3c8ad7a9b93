"""The README's main command on the shipped model, for real (slow: builds the emoji index)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_demo_retrieves_the_requested_emoji_and_writes_html(tmp_path):
    from fromage.apps.demo import REQUESTS, run_demo
    from fromage.pipeline import RetrievedImage

    lines: list[str] = []
    report = run_demo(index_dir=tmp_path / "idx", html_path=tmp_path / "demo.html", echo=lines.append)
    assert report.correct == report.requests == len(REQUESTS), "\n".join(lines)
    printed = "\n".join(lines)
    assert "show me a red apple" in printed and "| red apple |" in printed
    caption = report.transcript[1].items[0]
    assert isinstance(caption, str) and caption.strip()  # a caption is produced for the photo
    retrieved = [i for t in report.transcript for i in t.items if isinstance(i, RetrievedImage)]
    user_images = sum(
        1 for t in report.transcript if t.role == "user" for i in t.items if not isinstance(i, str)
    )
    assert user_images == 3  # the photo, then two images in one prompt
    html = report.html.read_text()
    assert html.count('src="data:image/png;base64,') == user_images + len(retrieved)
