"""The Gradio UI end to end in headless Chromium (Debian's package, driven by Playwright's Python API).

Never `playwright install`: the test uses /usr/bin/chromium and skips when it is missing
(`.ci/install_browser.sh` installs it in CI).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from PIL import Image

from app import ui
from app.engine import ChatEngine
from mllm.generation import GenerationConfig

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"{CHROMIUM} not found: run .ci/install_browser.sh (apt-get install chromium)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # uploads and exports
    # ~30 ms a token: long enough to watch the answer grow and to press Stop half way.
    hook = tiny_model.llm.register_forward_hook(lambda *_: time.sleep(0.03))
    # Two conversations kept: two newer ones make the engine forget the page's.
    engine = ChatEngine(tiny_model, name="tiny", gen=GenerationConfig(max_new_tokens=80), max_conversations=2)
    exports = ui.export_shelf()
    demo = ui.build(engine, ui.make_examples(tmp_path / "examples"), exports=exports)
    port = _free_port()
    ui.launch(demo, "127.0.0.1", port, allowed=[tmp_path], block=False)
    yield f"http://127.0.0.1:{port}", engine
    demo.close()
    exports.close()
    hook.remove()


@pytest.fixture
def page():
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser.new_page(viewport={"width": 1280, "height": 1000})
        browser.close()


def _reply_length(page) -> int:
    texts = page.locator("#chat .bot").all_inner_texts()
    return len(texts[-1]) if texts else 0


def _wait_until_still(page, timeout: float = 15.0) -> int:
    """The reply's length once it stops changing (two reads 0.6 s apart agree)."""
    deadline, last = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        now = _reply_length(page)
        if now == last and now > 0:
            return now
        last = now
        time.sleep(0.6)
    raise AssertionError("the reply kept changing")


def _ask(page, text: str, image: Path) -> None:
    page.locator("#box input[type=file]").set_input_files(str(image))
    page.locator("#box textarea").fill(text)
    page.locator("#box textarea").press("Enter")


def test_chat_in_the_browser(app_url, page, tmp_path):
    url, engine = app_url
    page.goto(url, wait_until="load")
    page.wait_for_selector("#box textarea")
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (220, 30, 30)).save(image)

    _ask(page, "what color is this?", image)
    page.wait_for_selector("#chat .bot", timeout=15_000)
    page.wait_for_function("() => document.querySelector('#chat .bot')?.innerText.length > 0", timeout=15_000)
    grows = [_reply_length(page)]
    for _ in range(3):
        time.sleep(0.3)
        grows.append(_reply_length(page))
    assert grows == sorted(grows) and grows[-1] > grows[0], f"the reply did not stream: {grows}"

    page.locator("#stop").click()
    stopped = _wait_until_still(page)
    assert engine.info()["running"] == 0  # the engine stopped decoding, not just the page
    page.screenshot(path=str(tmp_path / "ui-stopped.png"), full_page=True)

    page.locator("#regenerate").click()
    page.wait_for_function(f"() => document.querySelector('#chat .bot')?.innerText.length != {stopped}")
    full = _wait_until_still(page)
    assert full > stopped  # 80 tokens this time: the stopped reply was cut short
    assert page.locator("#chat .user img").count() == 1  # the image stayed with its message
    page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)

    page.locator("#export").click()  # a download link for the LLaVA JSON and the zip with its images
    page.get_by_text(".zip").first.wait_for(timeout=15_000)

    page.locator("#undo").click()  # the last message goes back into the box for editing
    page.wait_for_function("() => document.querySelector('#box textarea').value === 'what color is this?'")
    assert page.locator("#chat .bot").count() == 0

    page.locator("#clear").click()
    page.wait_for_function("() => document.querySelectorAll('#chat .message').length === 0")
    page.locator("#export").click()  # nothing to export: a message, and no conversation is made for it
    page.get_by_text("nothing to export yet").first.wait_for(timeout=15_000)

    _ask(page, "what color is this?", image)
    page.wait_for_selector("#chat .bot", timeout=15_000)
    _wait_until_still(page)
    engine.new_conversation(), engine.new_conversation()  # the engine forgets the page's conversation
    page.locator("#box textarea").fill("and now?")
    page.locator("#box textarea").press("Enter")
    page.get_by_text("this conversation expired").first.wait_for(timeout=15_000)
    assert page.locator("#box textarea").input_value() == "and now?"  # nothing lost: the message waits
    assert page.locator("#chat .bot").count() == 1  # the old chat stays on screen
    page.locator("#clear").click()
    page.wait_for_function("() => document.querySelectorAll('#chat .message').length === 0")
    page.locator("#box textarea").press("Enter")  # the same message starts a new conversation
    page.wait_for_selector("#chat .bot", timeout=15_000)
    _wait_until_still(page)
    page.locator("#clear").click()
    page.wait_for_function("() => document.querySelectorAll('#chat .message').length === 0")

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    page.locator("#box textarea").fill("")
    _ask(page, "and this?", bad)
    page.get_by_text("not a readable image").first.wait_for(timeout=15_000)  # a warning; the app keeps running
    assert page.locator("#chat .message").count() == 0  # the bad turn left no trace
