"""Gradio chat UI over ChatEngine: wiring only; conversations, limits and cancel live in the engine.

`build(engine)` makes the Blocks app, `launch` serves it (the `mllm ui` command, app.cli, binds
127.0.0.1 unless told otherwise) and never creates a public share link; `make_examples` writes the example images.

Limits: Gradio's queue is sized from the engine's (`build`), uploads are capped per file (`launch`'s
`max_file_size`, by default the API's per-image limit) and `launch` takes an optional login (`auth`).
A conversation the engine forgot (the least recently used past its limit) is reported, never shown as a new
empty chat; Export makes nothing when there is nothing to export, and the exports live in one `Exports`
folder per process (the last few per browser session, all removed at exit).
"""

from __future__ import annotations

import random
import shutil
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder
from PIL import Image

from app.api_request import MAX_IMAGE_BYTES
from app.chat_store import ChatStore
from app.conversation import Exports, Turn
from app.engine import ChatEngine
from app.scheduling import ChatError
from mllm.generation import GenerationConfig
from training.synth_scene import make_scene, render

# System fonts: the default theme pulls Google Fonts, which an offline machine can't reach.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
MAX_UPLOAD_BYTES = MAX_IMAGE_BYTES  # per uploaded file: what the API takes per image
EXPIRED = (
    "this conversation expired: the server keeps only its most recent chats and forgot this one. "
    "Press Clear to start a new one"
)
NOTHING_TO_EXPORT = "nothing to export yet: ask something and get an answer first"


def make_examples(directory: Path) -> list[dict]:
    """Shapes-world scenes (always) and real photos from scikit-image (when installed), saved as PNG."""
    directory.mkdir(parents=True, exist_ok=True)
    shapes = []
    for seed in (3, 7, 11):
        shapes.append(str(directory / f"shapes-{seed}.png"))
        render(make_scene(random.Random(seed))).save(shapes[-1])
    examples = [
        {"text": "What shapes do you see, and what colour is each?", "files": shapes[:1]},
        {"text": "How many objects are in this picture?", "files": shapes[1:2]},
        {"text": "Which of these two pictures has more objects?", "files": shapes[1:3]},
    ]
    try:
        from skimage import data  # a dev dependency: the photo examples are a bonus
    except ImportError:
        return examples
    for name, question in [
        ("chelsea", "What animal is this?"),
        ("coffee", "What is on the table?"),
        ("astronaut", "Describe this photo."),
    ]:
        Image.fromarray(getattr(data, name)()).save(directory / f"{name}.png")
        examples.append({"text": question, "files": [str(directory / f"{name}.png")]})
    return examples


def chat_messages(turns: list[Turn]) -> list[dict]:
    """Engine turns -> Chatbot messages (images as files, then the text)."""
    out = []
    for turn in turns:
        content = [{"path": image} for image in turn.images if isinstance(image, str)]
        out.append({"role": "user", "content": content + ([turn.text] if turn.text else [])})
        if turn.reply is not None:
            out.append({"role": "assistant", "content": turn.reply})
    return out


def model_panel(info: dict) -> str:
    gib = info["weights_bytes"] / 2**30
    rows = [
        ("Vision tower", info["vision"]),
        ("Connector", info["connector"]),
        ("LLM", info["llm"]),
        ("Quantization", info["quantization"]),
        ("Device", info["device"]),
        ("Parameters", f"{info['parameters'] / 1e6:,.1f} M"),
        ("Weights in memory", f"{gib:.2f} GiB" if gib >= 0.1 else f"{gib * 1024:.1f} MiB"),
        ("Tokens per image", info["tokens_per_image"]),
        ("Images per chat", f"up to {info['max_images']}"),
        ("Context", f"{info['context_length']} tokens" if info["context_length"] else "model default"),
    ]
    return "| Model | |\n|---|---|\n" + "\n".join(f"| {k} | `{v}` |" for k, v in rows)


def export_shelf(keep: int = 3) -> Exports:
    """The process's export folder, inside Gradio's upload folder: Gradio serves a file there as it is, while
    one from anywhere else is first copied into that folder, and the copy would outlive `Exports`' cleanup."""
    return Exports(get_upload_folder(), keep=keep)


def build(
    engine: ChatEngine,
    examples: list[dict] | None = None,
    exports: Exports | None = None,
    store: ChatStore | None = None,
) -> gr.Blocks:
    """`store`: where chats are saved after each reply and reopened from (`app.chat_store`); None saves nothing."""
    exports = exports or export_shelf()

    def gen_config(temperature, top_p, max_tokens) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p))

    def on_queue(position: int) -> None:
        gr.Info(f"Waiting for the model: number {position} in the queue")

    def expired(conv) -> bool:
        """True (and the user told so) when the engine no longer holds this page's conversation."""
        if conv is None or engine.has_conversation(conv):
            return False
        gr.Warning(EXPIRED)
        return True

    def play(conv: str, start, shown: list[Turn], pending: Turn, box) -> Iterator[tuple]:
        """Start a reply (`start()` -> engine Stream) and stream it into the chat; errors become warnings."""
        try:
            stream = start()
        except ChatError as e:
            gr.Warning(str(e))
            yield chat_messages(engine.history(conv)), gr.skip(), conv
            return
        reply = ""
        yield chat_messages([*shown, pending]), box, conv
        try:
            for piece in stream:
                reply += piece
                yield chat_messages([*shown, Turn(pending.text, pending.images, reply)]), gr.skip(), conv
        except ChatError as e:
            gr.Warning(str(e))
        yield chat_messages(engine.history(conv)), gr.skip(), conv

    def respond(message: dict, conv, temperature, top_p, max_tokens, system: str = ""):
        if expired(conv):  # the message stays in the box and the old chat on screen
            yield gr.skip(), gr.skip(), conv
            return
        if conv is None:
            conv = engine.new_conversation(system=system.strip() or None)
        else:
            engine.set_system(conv, system)
        text, files = message.get("text", ""), list(message.get("files", []))
        gen = gen_config(temperature, top_p, max_tokens)
        start = partial(engine.stream, conv, text, files, gen, on_queue)
        empty = {"text": "", "files": []}
        yield from play(conv, start, engine.history(conv), Turn(text, files, ""), empty)

    def regenerate(conv, temperature, top_p, max_tokens, system: str = ""):
        if expired(conv):
            yield gr.skip(), gr.skip(), conv
            return
        turns = engine.history(conv) if conv else []
        if not turns:
            gr.Warning("nothing to regenerate yet: ask something first")
            yield gr.skip(), gr.skip(), conv
            return
        engine.set_system(conv, system)
        start = partial(engine.regenerate, conv, gen_config(temperature, top_p, max_tokens), on_queue)
        yield from play(conv, start, turns[:-1], Turn(turns[-1].text, turns[-1].images, ""), gr.skip())

    def busy():
        return gr.update(interactive=True)

    def idle(conv, saved=None):
        """After a reply: Stop greys out, the model's view of the conversation is brought up to date, and the chat
        is saved (a new chat gets its file now)."""
        if store is not None and conv and engine.has_conversation(conv):
            system_prompt, turns = engine.snapshot(conv)
            if turns:
                saved = saved or uuid.uuid4().hex
                try:
                    store.save(saved, system_prompt, turns)
                except OSError as e:
                    gr.Warning(f"the chat could not be saved to {store.folder} ({e.strerror or e})")
        return gr.update(interactive=False), *seen_view(conv), saved, saved_list(saved)

    def saved_list(selected=None):
        if store is None:
            return gr.update(choices=[], value=None)
        choices = [
            (f"{chat.title} ({time.strftime('%b %d %H:%M', time.localtime(chat.updated))})", chat.id)
            for chat in store.list()
        ]
        return gr.update(choices=choices, value=selected if selected in {c[1] for c in choices} else None)

    def open_chat(chat_id, conv):
        """The saved chat in place of the one on screen (which is saved already); its images as files to show."""
        if store is None or not chat_id:
            gr.Warning("choose a saved chat first")
            return (gr.skip(),) * 6
        try:
            chat = store.load(chat_id)
            folder = Path(get_upload_folder()) / "reopened" / chat_id
            folder.mkdir(parents=True, exist_ok=True)
            sources = []
            for _, images, _ in chat.turns:
                for image in images:
                    sources.append(str(folder / f"{len(sources) + 1}.png"))
                    image.save(sources[-1])
            new = engine.restore(chat.system, chat.turns, sources)
        except ChatError as e:
            gr.Warning(str(e))
            return (gr.skip(),) * 6
        if conv:
            engine.clear(conv)
        return chat_messages(engine.history(new)), new, chat_id, chat.system or "", *seen_view(new)

    def rename_chat(chat_id, title):
        try:
            store.rename(chat_id, title) if store is not None and chat_id else gr.Warning("choose a saved chat first")
        except ChatError as e:
            gr.Warning(str(e))
        return saved_list(chat_id), ""

    def delete_chat(chat_id, conv, saved):
        """Delete the chosen saved chat; if it is the one on screen, the screen is cleared too."""
        if store is None or not chat_id:
            gr.Warning("choose a saved chat first")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        store.delete(chat_id)
        if chat_id == saved:
            if conv:
                engine.clear(conv)
            return saved_list(), [], None, None
        return saved_list(saved), gr.skip(), gr.skip(), gr.skip()

    def seen_view(conv) -> tuple[list, str]:
        info = engine.seen(conv) if conv and engine.has_conversation(conv) else engine.seen("")
        n, size = info["tokens_per_image"], engine.model.processor.image_processor.image_size
        gallery = [(image, f"image {k + 1}: {size}x{size} px, {n} tokens") for k, image in enumerate(info["images"])]
        limit = info["context_length"]
        used = f"{info['context_tokens']:,} of {limit:,} tokens" if limit else f"{info['context_tokens']:,} tokens"
        return gallery, f"{len(gallery)} image(s) in this chat, {n} tokens each; context used: {used}"

    def stop_reply(conv) -> None:
        if conv:
            engine.cancel(conv)

    def undo(conv):
        if expired(conv):
            return gr.skip(), gr.skip()
        try:
            text, files = engine.undo(conv) if conv else ("", [])
        except ChatError as e:
            gr.Warning(str(e))
            return gr.skip(), gr.skip()
        # The removed message goes back into the box: edit it and send again.
        return chat_messages(engine.history(conv)) if conv else [], {"text": text, "files": files}

    def clear(conv):
        if conv:
            engine.clear(conv)
        return [], None, None  # no conversation until the next message: the engine creates it then

    def cleared():
        return *seen_view(None), None  # the next message starts a new saved chat

    def export(conv, request: gr.Request):
        if conv is None:  # asking the engine would create a conversation just to find it empty
            gr.Warning(NOTHING_TO_EXPORT)
            return gr.skip()
        if expired(conv):
            return gr.skip()
        folder = exports.folder(request.session_hash)
        try:
            path = engine.export_llava(conv, folder / "llava")
        except ChatError as e:
            exports.discard(folder)
            gr.Warning(str(e))
            return gr.skip()
        return [shutil.make_archive(str(folder / path.stem), "zip", path.parent), str(path)]

    def forget_exports(request: gr.Request) -> None:
        exports.drop(request.session_hash)

    with gr.Blocks(title="mllm: chat with images", analytics_enabled=False) as demo:
        conv = gr.State(None)
        saved = gr.State(None)  # the id of the page's chat in `store`, once saved
        gr.Markdown("## mllm: chat with images\nAttach one or more images, ask, and watch the answer stream in.")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=460, elem_id="chat", feedback_options=None)
                box = gr.MultimodalTextbox(
                    file_types=["image"],
                    file_count="multiple",
                    placeholder="Ask about your images (attach several if you like)...",
                    show_label=False,
                    elem_id="box",
                )
                with gr.Row():
                    # Active only while a reply is being generated (`busy` / `idle`).
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", interactive=False)
                    regen = gr.Button("Regenerate", elem_id="regenerate")
                    undo_btn = gr.Button("Undo / edit last", elem_id="undo")
                    clear_btn = gr.Button("Clear", elem_id="clear")
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[box], label="Examples")
                with gr.Accordion("What the model saw", open=False, elem_id="seen"):
                    seen_usage = gr.Markdown(seen_view(None)[1], elem_id="seen-usage")
                    seen = gr.Gallery(label="Each image as the vision tower received it", columns=4, height=240)
            with gr.Column(scale=1, min_width=340):
                system = gr.Textbox(
                    value="",
                    label="System prompt",
                    placeholder="Optional: how the assistant should answer. Applies from the next message on.",
                    lines=2,
                    elem_id="system",
                )
                temperature = gr.Slider(0, 2, value=engine.gen.temperature, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1, value=engine.gen.top_p, step=0.05, label="Top-p")
                max_tokens = gr.Slider(1, 1024, value=engine.gen.max_new_tokens, step=1, label="Max new tokens")
                with gr.Accordion("Saved chats", open=store is not None, visible=store is not None, elem_id="chats"):
                    saved_chats = gr.Dropdown(
                        label=f"In {store.folder}" if store is not None else "Saved chats",
                        choices=saved_list()["choices"],
                        value=None,
                        elem_id="saved-chats",
                    )
                    with gr.Row():
                        open_btn = gr.Button("Open", elem_id="open-chat")
                        delete_btn = gr.Button("Delete", elem_id="delete-chat")
                    new_title = gr.Textbox(show_label=False, placeholder="New name", elem_id="chat-title")
                    rename_btn = gr.Button("Rename", elem_id="rename-chat")
                gr.Markdown(model_panel(engine.info()), elem_id="model-panel")
                export_btn = gr.Button("Export as LLaVA JSON", elem_id="export")
                download = gr.File(label="LLaVA JSON (+ images, zipped)", file_count="multiple", interactive=False)

        sliders = [temperature, top_p, max_tokens]
        # concurrency_limit=None: the engine's own queue decides who generates and tells waiters their place.
        after = {"fn": idle, "inputs": [conv, saved], "outputs": [stop, seen, seen_usage, saved, saved_chats]}
        box.submit(busy, None, [stop], queue=False).then(
            respond, [box, conv, *sliders, system], [chatbot, box, conv], concurrency_limit=None
        ).then(**after)
        regen.click(busy, None, [stop], queue=False).then(
            regenerate, [conv, *sliders, system], [chatbot, box, conv], concurrency_limit=None
        ).then(**after)
        # Stop goes through the engine (the decode loop checks the event between tokens), not Gradio's cancel.
        stop.click(stop_reply, [conv], None, queue=False)
        undo_btn.click(undo, [conv], [chatbot, box]).then(**after)
        clear_btn.click(clear, [conv], [chatbot, download, conv]).then(cleared, None, [seen, seen_usage, saved])
        open_btn.click(open_chat, [saved_chats, conv], [chatbot, conv, saved, system, seen, seen_usage])
        rename_btn.click(rename_chat, [saved_chats, new_title], [saved_chats, new_title])
        delete_btn.click(delete_chat, [saved_chats, conv, saved], [saved_chats, chatbot, conv, saved])
        export_btn.click(export, [conv], [download])
        demo.unload(forget_exports)  # the tab closed: its exports go
    # Replies skip Gradio's line (concurrency_limit=None above): the engine runs max_concurrency of them, lets
    # max_queue wait and refuses the rest at once. The other clicks wait in Gradio's line, which refuses a click
    # ("queue is full") once it holds as many as the engine would take, instead of growing without end.
    return demo.queue(
        max_size=engine.max_concurrency + engine.max_queue, default_concurrency_limit=engine.max_concurrency
    )


def launch(
    demo: gr.Blocks,
    host: str,
    port: int,
    allowed: list[Path],
    *,
    auth: tuple[str, str] | None = None,
    max_file_size: int = MAX_UPLOAD_BYTES,
    block: bool = True,
):
    """Serve `demo`; `auth` (user, password) puts a login page in front, `max_file_size` caps each upload (bytes)."""
    return demo.launch(
        server_name=host,
        server_port=port,
        share=False,  # never a public gradio.live link
        auth=auth,
        max_file_size=max_file_size,
        allowed_paths=[str(p) for p in allowed],
        theme=THEME,
        prevent_thread_lock=not block,
        quiet=True,
        ssr_mode=False,
    )
