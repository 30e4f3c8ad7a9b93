"""The web demo in a real browser (Debian's chromium, driven by Playwright): slow, run by CI.
Leaves a screenshot in artifacts/web_demo.png.

The index is a folder tree with two subfolders (the Google emoji: food in one, everything else
in the other), so the demo must serve images from both and nothing outside its export folder."""

from __future__ import annotations

import re
import shutil
import socket
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from fromage.data.builtin import emoji_concepts, emoji_dir

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("chromium is not installed (make setup installs it: apt-get install chromium)")


def _file_name(concept: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", concept)


def _two_folder_emoji(root: Path) -> Path:

    source = emoji_dir("google") / "img" / "google" / "64"
    for concept in emoji_concepts("google"):
        sub = root / ("food" if concept.category.startswith("Food") else "other")
        sub.mkdir(parents=True, exist_ok=True)
        # A folder index has no captions: the demo shows file names, so name files by concept.
        shutil.copy(source / concept.image, sub / f"{_file_name(concept.name)}.png")
    return root


def _bot_images(page) -> list[str]:
    """Sources of the images in the bot's messages that the browser could load."""
    return page.eval_on_selector_all(
        "#chat .bot img", "els => els.filter(e => e.complete && e.naturalWidth > 0).map(e => e.src)"
    )


def test_web_demo_retrieves_from_a_folder_tree_and_reads_the_conversation(tmp_path):
    from fromage.apps.demo import skimage_photo
    from fromage.apps.indexing import index_collection
    from fromage.apps.webui import launch
    from fromage.checkpoint import SHIPPED

    browser_path = _chromium()
    index = tmp_path / "idx"
    index_collection(str(_two_folder_emoji(tmp_path / "emoji")), SHIPPED, index)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui, url = launch(SHIPPED, index, port=port, block=False)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 1400})
            page.goto(url)
            page.wait_for_selector("#message textarea", timeout=60_000)

            def send(text: str, files: list[str], images_before: int) -> str:
                if files:
                    page.set_input_files("#message input[type=file]", files)
                page.fill("#message textarea", text)
                page.press("#message textarea", "Enter")
                page.wait_for_function(
                    "n => document.querySelectorAll('#chat .bot img').length > n",
                    arg=images_before,
                    timeout=120_000,
                )
                page.wait_for_selector("#message textarea:not([disabled])", timeout=120_000)
                page.wait_for_timeout(500)
                return page.inner_text("#chat")

            # 1. A photo and a request: the red apple (food/), not the photo.
            text = send("show me a red apple", [str(skimage_photo("chelsea"))], 0)
            assert "red_apple · score" in text, text
            # 2. A turn that refers to the first: another fruit, any but the apple.
            text = send("show me another fruit", [], 1)
            captions = [line for line in text.splitlines() if "· score" in line]
            fruit = {_file_name(c.name) for c in emoji_concepts("google") if c.subcategory == "food-fruit"}
            assert len(captions) == 2 and captions[-1].split(" · ")[0].strip("* ") in fruit - {"red_apple"}, (
                captions
            )
            # 3. From the other subfolder.
            text = send("show me a dog face", [], 2)
            third = [line.split(" · ")[0].strip("* ") for line in text.splitlines() if "· score" in line][-1]
            other = {p.stem for p in (tmp_path / "emoji" / "other").iterdir()}
            assert third in other and "dog" in third, third  # from the other subfolder
            loaded = _bot_images(page)
            assert len(loaded) == 3 and len(set(loaded)) == 3  # all three served and shown
            user_images = page.eval_on_selector_all("#chat .user img", "els => els.map(e => e.src)")
            assert len(user_images) == 1 and user_images[0] not in loaded
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "web_demo.png"), full_page=True)
            # Nothing outside the export folder is served: the index's own files are refused.
            food = next((tmp_path / "emoji" / "food").iterdir())
            response = page.request.get(f"{url.rstrip('/')}/gradio_api/file={food}")
            assert response.status >= 400
            browser.close()
    finally:
        ui.close()
