"""Gradio chat UI over ChatEngine: wiring only; conversations, limits and cancel live in the engine.

`build(engine)` makes the Blocks app, `launch` serves it (the `mllm ui` command, app.cli, binds
127.0.0.1 unless told otherwise) and never creates a public share link; `make_examples` writes the example images.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import gradio as gr
from PIL import Image

from app.conversation import Turn
from app.engine import ChatEngine
from app.scheduling import ChatError
from mllm.generation import GenerationConfig
from training.synth_scene import make_scene, render

# System fonts: the default theme pulls Google Fonts, which an offline machine can't reach.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


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


def build(engine: ChatEngine, examples: list[dict] | None = None, export_dir: Path | None = None) -> gr.Blocks:
    export_dir = export_dir or Path(".")

    def gen_config(temperature, top_p, max_tokens) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p))

    def on_queue(position: int) -> None:
        gr.Info(f"Waiting for the model: number {position} in the queue")

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

    def respond(message: dict, conv, temperature, top_p, max_tokens):
        conv = conv or engine.new_conversation()
        text, files = message.get("text", ""), list(message.get("files", []))
        gen = gen_config(temperature, top_p, max_tokens)
        start = partial(engine.stream, conv, text, files, gen, on_queue)
        empty = {"text": "", "files": []}
        yield from play(conv, start, engine.history(conv), Turn(text, files, ""), empty)

    def regenerate(conv, temperature, top_p, max_tokens):
        turns = engine.history(conv) if conv else []
        if not turns:
            gr.Warning("nothing to regenerate yet: ask something first")
            yield gr.skip(), gr.skip(), conv
            return
        start = partial(engine.regenerate, conv, gen_config(temperature, top_p, max_tokens), on_queue)
        yield from play(conv, start, turns[:-1], Turn(turns[-1].text, turns[-1].images, ""), gr.skip())

    def stop_reply(conv) -> None:
        if conv:
            engine.cancel(conv)

    def undo(conv):
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
        return [], None

    def export(conv):
        export_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="llava-", dir=export_dir))  # one folder per export: the zip holds just it
        try:
            path = engine.export_llava(conv or engine.new_conversation(), folder)
        except ChatError as e:
            shutil.rmtree(folder, ignore_errors=True)
            gr.Warning(str(e))
            return gr.skip()
        return [shutil.make_archive(str(folder), "zip", folder), str(path)]

    with gr.Blocks(title="mllm: chat with images", analytics_enabled=False) as demo:
        conv = gr.State(None)
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
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    regen = gr.Button("Regenerate", elem_id="regenerate")
                    undo_btn = gr.Button("Undo / edit last", elem_id="undo")
                    clear_btn = gr.Button("Clear", elem_id="clear")
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[box], label="Examples")
            with gr.Column(scale=1, min_width=340):
                temperature = gr.Slider(0, 2, value=engine.gen.temperature, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1, value=engine.gen.top_p, step=0.05, label="Top-p")
                max_tokens = gr.Slider(1, 1024, value=engine.gen.max_new_tokens, step=1, label="Max new tokens")
                gr.Markdown(model_panel(engine.info()), elem_id="model-panel")
                export_btn = gr.Button("Export as LLaVA JSON", elem_id="export")
                download = gr.File(label="LLaVA JSON (+ images, zipped)", file_count="multiple", interactive=False)

        sliders = [temperature, top_p, max_tokens]
        # concurrency_limit=None: the engine's own queue decides who generates and tells waiters their place.
        box.submit(respond, [box, conv, *sliders], [chatbot, box, conv], concurrency_limit=None)
        regen.click(regenerate, [conv, *sliders], [chatbot, box, conv], concurrency_limit=None)
        # Stop goes through the engine (the decode loop checks the event between tokens), not Gradio's cancel.
        stop.click(stop_reply, [conv], None, queue=False)
        undo_btn.click(undo, [conv], [chatbot, box])
        clear_btn.click(clear, [conv], [chatbot, download])
        export_btn.click(export, [conv], [download])
    return demo


def launch(demo: gr.Blocks, host: str, port: int, allowed: list[Path], block: bool = True):
    return demo.queue().launch(
        server_name=host,
        server_port=port,
        share=False,
        allowed_paths=[str(p) for p in allowed],
        theme=THEME,
        prevent_thread_lock=not block,
        quiet=True,
        ssr_mode=False,
    )
