"""Saved chats: the file format round trip, refusals of bad ids and damaged files, and a reopened conversation that
goes on exactly as the unbroken one would (the engine's restore, on the tiny model); the UI's handlers save after
each reply, list, open, rename and delete. The browser test covers the same flow in a page."""

from __future__ import annotations

import json

import gradio as gr
import pytest
from PIL import Image

from app import ui
from app.chat_store import ChatStore
from app.engine import ChatEngine
from app.scheduling import ChatError
from mllm.generation import GenerationConfig

SLIDERS = (0.0, 1.0, 8)


@pytest.fixture
def engine(tiny_model, one_thread):
    return ChatEngine(tiny_model, name="tiny", gen=GenerationConfig(max_new_tokens=8))


def red(size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, (220, 30, 30))


def test_a_chat_file_round_trips_and_is_replaced_whole(tmp_path):
    store = ChatStore(tmp_path / "chats")
    chat_id = "a" * 32
    turns = [("what is it?", [red()], "a red square"), ("and now?", [], "still red")]
    store.save(chat_id, "be brief", turns)
    body = json.loads((tmp_path / "chats" / f"{chat_id}.json").read_text())
    assert body["format"] == "mllm-chat" and body["version"] == 1 and body["title"] == "what is it?"
    chat = store.load(chat_id)
    assert chat.system == "be brief" and [(t, r) for t, _, r in chat.turns] == [(t, r) for t, _, r in turns]
    assert list(chat.turns[0][1][0].getdata()) == list(red().getdata())  # the pixels, losslessly
    created = chat.created
    store.rename(chat_id, "  my   red chat ")
    store.save(chat_id, "be brief", turns + [("last", [], "ok")])  # a later save keeps the name and creation time
    (listed,) = store.list()
    assert listed.title == "my red chat" and listed.created == created and listed.updated >= created
    assert [p.name for p in (tmp_path / "chats").iterdir()] == [f"{chat_id}.json"]  # no temporary left behind
    store.delete(chat_id)
    assert store.list() == []


def test_bad_ids_and_damaged_files_are_refused_by_name(tmp_path):
    store = ChatStore(tmp_path)
    for bad in ("../../etc/passwd", "A" * 32, "", "a" * 31):
        with pytest.raises(ChatError, match="not a saved chat's id"):
            store.load(bad)
    (tmp_path / f"{'b' * 32}.json").write_text("{not json")
    (tmp_path / f"{'c' * 32}.json").write_text(json.dumps({"format": "other"}))
    assert store.list() == []  # unreadable files are skipped, not fatal
    with pytest.raises(ChatError, match="cannot be read"):
        store.load("b" * 32)
    with pytest.raises(ChatError, match="not an mllm chat file"):
        store.load("c" * 32)
    with pytest.raises(ChatError, match="there is no saved chat"):
        store.load("d" * 32)
    with pytest.raises(ChatError, match="type a name"):
        store.save("e" * 32, None, [("hi", [], "yo")]) or store.rename("e" * 32, "   ")
    (tmp_path / "file").write_text("")
    with pytest.raises(ChatError, match="cannot create the chats folder"):
        ChatStore(tmp_path / "file" / "chats")


def test_a_restored_conversation_goes_on_as_the_unbroken_one(engine, tmp_path):
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    unbroken = engine.new_conversation(system="be brief")
    "".join(engine.stream(unbroken, "what is it?", [red()], gen=gen))
    system, turns = engine.snapshot(unbroken)
    store = ChatStore(tmp_path)
    store.save("f" * 32, system, turns)
    saved = store.load("f" * 32)
    reopened = engine.restore(saved.system, saved.turns)
    assert engine.history(reopened)[0].reply == engine.history(unbroken)[0].reply
    follow_up = "".join(engine.stream(unbroken, "and the colour?", gen=gen))
    assert "".join(engine.stream(reopened, "and the colour?", gen=gen)) == follow_up
    assert engine.seen(reopened)["context_tokens"] == engine.seen(unbroken)["context_tokens"]


def test_the_ui_saves_after_each_reply_and_opens_renames_and_deletes(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    store = ChatStore(tmp_path / "chats")
    handlers = {f.name: f.fn for f in ui.build(engine, store=store).fns.values()}
    image = tmp_path / "red.png"
    red().save(image)
    *_, (_, _, conv) = handlers["respond"]({"text": "what is it?", "files": [str(image)]}, None, *SLIDERS, "be brief")
    *_, saved, listing = handlers["idle"](conv, None)
    (chat,) = store.list()
    assert chat.id == saved and chat.system == "be brief" and listing["value"] == saved
    assert listing["choices"][0][1] == saved and listing["choices"][0][0].startswith("what is it?")

    assert handlers["cleared"]()[-1] is None  # Clear: the next message is a new chat
    handlers["clear"](conv)
    messages, reopened, opened, system, gallery, _ = handlers["open_chat"](saved, None)
    assert opened == saved and system == "be brief" and len(gallery) == 1
    assert messages[0]["role"] == "user" and messages[1]["content"] == engine.history(reopened)[0].reply
    list(handlers["respond"]({"text": "and now?", "files": []}, reopened, *SLIDERS, "be brief"))
    handlers["idle"](reopened, opened)
    assert len(store.load(saved).turns) == 2 and len(store.list()) == 1  # the same file, one more turn

    listing, title = handlers["rename_chat"](saved, "Red things")
    assert store.list()[0].title == "Red things" and title == ""
    listing, chat_on_screen, page_conv, page_saved = handlers["delete_chat"](saved, reopened, saved)
    assert store.list() == [] and chat_on_screen == [] and page_conv is None and page_saved is None
    assert not engine.has_conversation(reopened)
    with pytest.warns(UserWarning, match="choose a saved chat first"):
        assert handlers["open_chat"](None, None) == (gr.skip(),) * 6
