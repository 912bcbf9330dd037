"""The Gradio UI end to end in headless Chromium (Debian's package, driven by Playwright's Python API).

Never `playwright install`: the test uses /usr/bin/chromium, which `make test` installs first
(`scripts/install_browser.sh`; its failure fails the run). Outside CI a missing browser skips with the reason;
in CI (the CI variable set) it fails: the UI's only end-to-end evidence must not vanish quietly.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from playwright.sync_api import sync_playwright

from app import ui
from app.engine import ChatEngine
from mllm.assembly import build_model
from mllm.checkpoint import save_pretrained
from mllm.generation import GenerationConfig, generate
from mllm.loading import load_model

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
    not os.access(CHROMIUM, os.X_OK) and not os.environ.get("CI"),
    reason=f"{CHROMIUM} not found: run scripts/install_browser.sh (apt-get install chromium)",
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
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser.new_page(viewport={"width": 1280, "height": 1000})
        browser.close()


def _reply_length(page) -> int:
    texts = page.locator("#chat .bot").all_inner_texts()
    return len(texts[-1]) if texts else 0


def _wait_until_still(page, engine=None, timeout: float = 30.0) -> int:
    """The reply's length once it stops changing: the engine has finished (when given), then two reads of the
    page 0.6 s apart agree."""
    deadline, last = time.monotonic() + timeout, -1
    while engine is not None and engine.info()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
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
    assert page.locator("#stop").is_disabled()  # nothing is being generated
    page.locator("#system textarea").fill("You answer in one word.")

    _ask(page, "what color is this?", image)
    page.wait_for_function("() => !document.querySelector('#stop').disabled", timeout=15_000)
    page.wait_for_selector("#chat .bot", timeout=15_000)
    page.wait_for_function("() => document.querySelector('#chat .bot')?.innerText.length > 0", timeout=15_000)
    shown = _reply_length(page)
    # Streaming: the reply on the page grows after its first piece showed (80 tokens at >= 30 ms each).
    page.wait_for_function(f"() => document.querySelector('#chat .bot').innerText.length > {shown}", timeout=15_000)

    page.locator("#stop").click()
    stopped = _wait_until_still(page, engine)
    assert engine.info()["running"] == 0  # the engine stopped decoding, not just the page
    page.wait_for_function("() => document.querySelector('#stop').disabled", timeout=15_000)
    (conversation,) = [c for c in engine._conversations if engine.history(c)]
    assert engine._conversations[conversation].session.messages[0] == {
        "role": "system",
        "content": "You answer in one word.",
    }
    page.get_by_text("What the model saw").click()  # the image as the tower got it, and the context used
    page.locator("#seen img").first.wait_for(timeout=15_000)
    assert page.locator("#seen img").count() == 1
    page.get_by_text("context used:").first.wait_for(timeout=15_000)
    page.screenshot(path=str(tmp_path / "ui-stopped.png"), full_page=True)

    page.locator("#regenerate").click()
    page.wait_for_function(f"() => document.querySelector('#chat .bot')?.innerText.length != {stopped}")
    full = _wait_until_still(page, engine)
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
    _wait_until_still(page, engine)
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
    _wait_until_still(page, engine)
    page.locator("#clear").click()
    page.wait_for_function("() => document.querySelectorAll('#chat .message').length === 0")

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    page.locator("#box textarea").fill("")
    _ask(page, "and this?", bad)
    page.get_by_text("not a readable image").first.wait_for(timeout=15_000)  # a warning; the app keeps running
    assert page.locator("#chat .message").count() == 0  # the bad turn left no trace


@pytest.fixture
def default_app_url(tiny_config, tmp_path, monkeypatch):
    """The UI over the CPU default backend (llama.cpp today), as `mllm ui` serves the tiny model."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    torch.manual_seed(0)
    save_pretrained(build_model(tiny_config, device="cpu").eval(), tmp_path / "ckpt")
    model = load_model(str(tmp_path / "ckpt"), device="cpu")
    engine = ChatEngine(model, name="tiny", gen=GenerationConfig(max_new_tokens=12))
    exports = ui.export_shelf()
    demo = ui.build(engine, exports=exports)
    port = _free_port()
    ui.launch(demo, "127.0.0.1", port, allowed=[tmp_path], block=False)
    yield f"http://127.0.0.1:{port}", engine, model
    demo.close()
    exports.close()


def test_the_cpu_default_backend_answers_in_the_browser(default_app_url, page, tmp_path):
    url, engine, model = default_app_url
    page.goto(url, wait_until="load")
    page.wait_for_selector("#box textarea")
    image = tmp_path / "blue.png"
    Image.new("RGB", (48, 64), (30, 30, 220)).save(image)
    _ask(page, "what color is this?", image)
    page.wait_for_selector("#chat .bot", timeout=15_000)
    _wait_until_still(page, engine)
    # The page's conversation is the engine's only one; its reply is the greedy reply to the same message.
    (conversation,) = engine._conversations
    (turn,) = engine.history(conversation)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is this?"}]}]
    expected = generate(model, messages, [Image.open(image).convert("RGB")], gen=GenerationConfig(max_new_tokens=12))
    assert turn.reply == expected and expected
    assert page.locator("#chat .bot").count() == 1 and page.locator("#chat .user img").count() == 1


def test_chats_are_saved_and_reopened_after_a_restart(tiny_model, tmp_path, monkeypatch, page):
    """A chat with a system prompt is saved after its reply; a new server over the same folder (a restart) lists it,
    and Open brings back its messages, its image and its system prompt, and the chat goes on."""
    from app.chat_store import ChatStore

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    image = tmp_path / "green.png"
    Image.new("RGB", (48, 48), (30, 200, 30)).save(image)

    def serve():
        engine = ChatEngine(tiny_model, name="tiny", gen=GenerationConfig(max_new_tokens=8))
        demo = ui.build(engine, store=ChatStore(tmp_path / "chats"))
        port = _free_port()
        ui.launch(demo, "127.0.0.1", port, allowed=[tmp_path], block=False)
        return demo, engine, f"http://127.0.0.1:{port}"

    demo, engine, url = serve()
    page.goto(url, wait_until="load")
    page.wait_for_selector("#box textarea")
    page.locator("#system textarea").fill("Answer briefly.")
    _ask(page, "what colour is the square?", image)
    page.wait_for_selector("#chat .bot", timeout=15_000)
    page.wait_for_function("() => document.querySelector('#stop').disabled", timeout=15_000)
    reply = page.locator("#chat .bot").first.inner_text()
    deadline = time.monotonic() + 15
    while not list((tmp_path / "chats").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    (saved,) = ChatStore(tmp_path / "chats").list()
    assert saved.title == "what colour is the square?" and saved.system == "Answer briefly."
    demo.close()

    demo, engine, url = serve()  # the restart: a new engine that never saw the chat
    page.goto(url, wait_until="load")
    page.wait_for_selector("#box textarea")
    assert page.locator("#chat .message").count() == 0
    page.locator("#saved-chats input").click()
    page.get_by_role("option", name="what colour is the square?", exact=False).click()
    page.locator("#open-chat").click()
    page.wait_for_selector("#chat .bot", timeout=15_000)
    assert page.locator("#chat .bot").first.inner_text() == reply
    assert page.locator("#chat .user img").count() == 1
    assert page.locator("#system textarea").input_value() == "Answer briefly."
    page.locator("#box textarea").fill("and the background?")
    page.locator("#box textarea").press("Enter")
    page.wait_for_function("() => document.querySelectorAll('#chat .bot').length === 2", timeout=15_000)
    page.wait_for_function("() => document.querySelector('#stop').disabled", timeout=15_000)
    deadline = time.monotonic() + 15
    while len(ChatStore(tmp_path / "chats").load(saved.id).turns) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(ChatStore(tmp_path / "chats").load(saved.id).turns) == 2  # the same file, one more turn
    demo.close()
