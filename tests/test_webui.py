"""The web demo in a real browser (Debian's chromium, driven by Playwright): slow, run by CI.
Leaves a screenshot in artifacts/web_demo.png."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("chromium is not installed (make setup installs it: apt-get install chromium)")


def test_web_demo_answers_a_photo_and_a_request_with_an_image():
    from fromage.apps.demo import emoji_index, skimage_photo
    from fromage.apps.webui import launch
    from fromage.checkpoint import SHIPPED

    browser_path = _chromium()
    index = emoji_index(SHIPPED)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui, url = launch(SHIPPED, index, port=port, block=False)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#message textarea", timeout=60_000)
            page.set_input_files("#message input[type=file]", str(skimage_photo("chelsea")))
            page.fill("#message textarea", "show me a red apple")
            page.press("#message textarea", "Enter")
            # The user's photo is in the chat too: wait for an image in a *bot* message.
            answer = page.wait_for_selector("#chat .bot img", timeout=120_000)
            assert answer is not None and (answer.get_attribute("src") or "").strip()
            user_images = [i.get_attribute("src") for i in page.query_selector_all("#chat .user img")]
            assert len(user_images) == 1 and answer.get_attribute("src") not in user_images
            page.wait_for_timeout(1000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "web_demo.png"), full_page=True)
            text = page.inner_text("#chat")
            assert "show me a red apple" in text and "score" in text
            browser.close()
    finally:
        ui.close()
