"""The Gradio UI's limits and bookkeeping: queue size, upload cap, login, exports on disk, forgotten conversations.

The handlers are called as Gradio registered them (`demo.fns`); their warnings, raised outside a request, come
out as Python warnings. The served app is driven over HTTP (httpx, gradio_client) where Gradio itself enforces
the limit. The whole browser flow is in test_ui_browser.py.
"""

from __future__ import annotations

import io
import socket
import time
import zipfile
from pathlib import Path

import gradio as gr
import httpx
import pytest
from PIL import Image

from app import ui
from app.api_request import MAX_IMAGE_BYTES
from app.conversation import Exports
from app.engine import ChatEngine
from mllm.generation import GenerationConfig

SLIDERS = (0.0, 1.0, 8)  # temperature, top-p, max new tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def engine(tiny_model, one_thread):
    limits = {"max_concurrency": 2, "max_queue": 3, "max_conversations": 2}
    return ChatEngine(tiny_model, name="tiny", gen=GenerationConfig(max_new_tokens=8), **limits)


@pytest.fixture
def exports(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # Gradio's upload folder, read at build
    shelf = ui.export_shelf(keep=2)
    assert shelf.root.parent == tmp_path / "gradio"
    yield shelf
    shelf.close()


@pytest.fixture
def demo(engine, exports):
    return ui.build(engine, exports=exports)


@pytest.fixture
def handlers(demo) -> dict:
    return {f.name: f.fn for f in demo.fns.values()}


def _session(name: str) -> gr.Request:
    return gr.Request(session_hash=name)


def _chat(handlers, text: str = "what is this?", conv=None, files=()) -> str:
    """Send one message through the UI's handler; returns the conversation id it answered in."""
    *_, (messages, _, conv) = handlers["respond"]({"text": text, "files": list(files)}, conv, *SLIDERS)
    assert messages[-1]["role"] == "assistant" and messages[-1]["content"].strip(), messages
    return conv


def _exported(exports: Exports) -> list[Path]:
    return sorted(exports.root.iterdir())


def test_gradio_queue_is_sized_from_the_engine(demo):
    assert demo._queue.max_size == 2 + 3  # what the engine holds at most: 2 running + 3 waiting
    assert demo._queue.default_concurrency_limit == 2
    limits = {f.name: f.concurrency_limit for f in demo.fns.values()}
    # Replies go straight to the engine, which queues and refuses them itself; the rest wait in Gradio's line.
    assert limits["respond"] is None and limits["regenerate"] is None
    assert limits["export"] == limits["undo"] == limits["clear"] == "default"


def test_export_with_nothing_to_export_creates_nothing(engine, handlers, exports):
    kept = _chat(handlers)
    for _ in range(3):  # each used to create a conversation: the 2nd would have evicted `kept` (limit 2)
        with pytest.warns(UserWarning, match="nothing to export yet"):
            assert handlers["export"](None, _session("s1")) == gr.skip()
    assert engine.has_conversation(kept)
    assert _exported(exports) == []

    # A conversation whose only message failed has no answer: nothing is written, the folder goes again.
    with pytest.warns(UserWarning, match="not a readable image"):
        *_, (_, _, empty) = handlers["respond"]({"text": "hi", "files": [__file__]}, None, *SLIDERS)
    assert engine.has_conversation(empty) and engine.history(empty) == []
    with pytest.warns(UserWarning, match="nothing to export yet"):
        assert handlers["export"](empty, _session("s1")) == gr.skip()
    assert _exported(exports) == []


def test_exports_keep_the_last_per_session_and_go_with_it(handlers, exports, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 24), (220, 30, 30)).save(image)
    conv = _chat(handlers, files=[str(image)])
    made = [handlers["export"](conv, _session("s1")) for _ in range(3)]
    other = handlers["export"](conv, _session("s2"))

    for zip_path, json_path in [*made[1:], other]:  # the last two of s1 (keep=2), and s2's
        assert Path(json_path).is_file()
        names = zipfile.ZipFile(zip_path).namelist()
        assert Path(json_path).name in names and sum(n.endswith(".png") for n in names) == 1
    assert not Path(made[0][0]).exists() and not Path(made[0][1]).exists()  # the oldest was deleted
    assert len(exports.owned("s1")) == 2 and len(_exported(exports)) == 3

    handlers["forget_exports"](_session("s1"))  # the tab closed
    assert not any(Path(p).exists() for pair in made for p in pair)
    assert Path(other[0]).exists() and _exported(exports) == exports.owned("s2")

    exports.close()  # the process ends
    assert not exports.root.exists()


def test_exports_cap_the_total_and_never_use_the_owner_in_a_path(tmp_path):
    shelf = Exports(tmp_path, keep=5, max_total=3)
    owners = ["../../escape", "/abs", "a", "b"]
    folders = [shelf.folder(owner) for owner in owners]
    assert all(folder.parent == shelf.root for folder in folders)
    assert [f.exists() for f in folders] == [False, True, True, True]  # oldest first past max_total
    shelf.discard(folders[2])
    assert sorted(shelf.root.iterdir()) == sorted([folders[1], folders[3]])
    with pytest.raises(ValueError):
        Exports(tmp_path, keep=0)
    shelf.close()
    assert not shelf.root.exists() and tmp_path.exists()


def test_a_forgotten_conversation_is_reported_not_shown_empty(engine, handlers, exports):
    conv = _chat(handlers)
    engine.new_conversation(), engine.new_conversation()  # two newer chats: `conv` is the least recently used
    assert not engine.has_conversation(conv)

    with pytest.warns(UserWarning, match="this conversation expired") as warned:
        assert list(handlers["respond"]({"text": "and now?", "files": []}, conv, *SLIDERS)) == [
            (gr.skip(), gr.skip(), conv)  # the chat on screen and the message in the box stay
        ]
        assert list(handlers["regenerate"](conv, *SLIDERS)) == [(gr.skip(), gr.skip(), conv)]
        assert handlers["undo"](conv) == (gr.skip(), gr.skip())
        assert handlers["export"](conv, _session("s1")) == gr.skip()
    assert len(warned) == 4 and "Press Clear to start a new one" in str(warned[0].message)
    assert not engine.has_conversation(conv)  # none of them brought it back empty
    assert _exported(exports) == []

    assert handlers["clear"](conv) == ([], None, None)  # no conversation on the page any more
    assert _chat(handlers, conv=None) != conv  # the next message starts a new one


def test_clear_forgets_the_conversation_and_the_page_state(engine, handlers):
    conv = _chat(handlers)
    assert handlers["clear"](conv) == ([], None, None)
    assert not engine.has_conversation(conv)


@pytest.fixture
def served(engine, demo, tmp_path):
    """Launch `demo`; yields a function that serves it with launch's keyword arguments and returns its URL."""

    def serve(**kwargs) -> str:
        port = _free_port()
        ui.launch(demo, "127.0.0.1", port, allowed=[tmp_path], block=False, **kwargs)
        return f"http://127.0.0.1:{port}"

    yield serve
    demo.close()


def test_login_and_upload_limit_are_enforced(demo, served):
    url = served(auth=("ann", "s3cret:x"), max_file_size=2**20)
    assert demo.auth == [("ann", "s3cret:x")] and demo.max_file_size == 2**20 and not demo.share
    upload = f"{url}/gradio_api/upload"

    def files(n_bytes: int) -> dict:
        return {"files": ("a.png", io.BytesIO(b"\0" * n_bytes), "image/png")}

    with httpx.Client(timeout=30) as anonymous:
        assert anonymous.get(f"{url}/config").status_code == 401
        assert anonymous.post(upload, files=files(10)).status_code == 401
        wrong = anonymous.post(f"{url}/login", data={"username": "ann", "password": "s3cret"})
        assert wrong.status_code == 400
    with httpx.Client(timeout=30) as client:
        assert client.post(f"{url}/login", data={"username": "ann", "password": "s3cret:x"}).status_code == 200
        assert client.get(f"{url}/config").status_code == 200
        assert client.post(upload, files=files(2**20 + 1)).status_code == 413
        small = client.post(upload, files=files(2**20))
        assert small.status_code == 200 and len(small.json()) == 1


def test_served_defaults_and_export_over_the_wire(engine, demo, served, exports, tmp_path, monkeypatch):
    from gradio_client import Client, handle_file

    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.5")  # a closed session is noticed within a heartbeat
    url = served()
    assert demo.max_file_size == MAX_IMAGE_BYTES and demo.auth is None and not demo.share
    other = engine.new_conversation()  # someone else's chat: the limit is 2
    client = Client(url, verbose=False, download_files=False)
    for _ in range(3):
        client.predict(api_name="/export")
    assert engine.has_conversation(other) and _exported(exports) == []

    image = tmp_path / "blue.png"
    Image.new("RGB", (30, 30), (30, 30, 220)).save(image)
    client.predict({"text": "what colour?", "files": [handle_file(str(image))]}, *SLIDERS, api_name="/respond")
    zipped, row = client.predict(api_name="/export")
    # Served from the export folder as it is (no copy in Gradio's cache that would outlive the cleanup).
    assert Path(zipped["path"]).parent.parent == exports.root == Path(row["path"]).parent.parent.parent
    assert Path(row["path"]).name in zipfile.ZipFile(zipped["path"]).namelist()

    client.close()  # the session ends (a closed tab): Gradio runs the unload handler, which deletes its exports
    deadline = time.monotonic() + 10
    while _exported(exports) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _exported(exports) == [] and not Path(zipped["path"]).exists()


def test_the_system_prompt_reaches_the_conversation_and_can_change(engine, handlers):
    *_, (_, _, conv) = handlers["respond"]({"text": "hi", "files": []}, None, *SLIDERS, "Answer in French.")
    messages = engine._conversations[conv].session.messages
    assert messages[0] == {"role": "system", "content": "Answer in French."} and messages[1]["role"] == "user"
    *_, (_, _, same) = handlers["respond"]({"text": "and?", "files": []}, conv, *SLIDERS, "Answer in German.")
    messages = engine._conversations[conv].session.messages
    assert same == conv and messages[0]["content"] == "Answer in German." and len(messages) == 5
    list(handlers["respond"]({"text": "again", "files": []}, conv, *SLIDERS, "  "))  # blank: no system prompt
    assert [m["role"] for m in engine._conversations[conv].session.messages][:2] == ["user", "assistant"]


def test_the_models_view_shows_each_image_as_the_tower_got_it_and_the_context_used(engine, handlers, tmp_path):
    image = tmp_path / "wide.png"
    Image.new("RGB", (64, 16), (220, 30, 30)).save(image)
    conv = _chat(handlers, files=[str(image)])
    stop, gallery, usage, saved, _ = handlers["idle"](conv)
    assert saved is None  # no store: nothing saved
    assert stop == gr.update(interactive=False)
    size = engine.model.processor.image_processor.image_size
    ((shown, caption),) = gallery
    assert shown.size == (size, size)  # padded to a square and resized: what the tower received
    assert caption == f"image 1: {size}x{size} px, {engine.model.tokens_per_image} tokens"
    info = engine.seen(conv)
    assert info["context_tokens"] > engine.model.tokens_per_image
    assert f"context used: {info['context_tokens']:,} of {info['context_length']:,} tokens" in usage
    assert handlers["busy"]() == gr.update(interactive=True)
    assert handlers["cleared"]()[0] == []
