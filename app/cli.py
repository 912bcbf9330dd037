"""The `mllm` command: `COMMANDS` maps each name to a function that parses its flags and calls the library.

chat (a terminal chat, below), data validate / convert / synth / views / photos, train and eval (the training
package's commands), convert and export (mllm.interop; `export --format gguf`: mllm.gguf_export), ui (app.ui's
Gradio app) and api (app.api's HTTP server). All are built on mllm.commandline: a user error (a bad flag, a missing
or unreadable image, a model that does not load) prints one line on stderr and exits with status 2, never
argparse's usage dump or a traceback.
Each command imports what it runs when it runs: `mllm --help` loads neither Gradio, FastAPI nor the training package.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from mllm.commandline import EXIT_USAGE, Parser, UsageError, add_model_args, add_server_args, quantization, run
from mllm.errors import ImageError, MLLMError
from mllm.hub import local_path


def load_model(args: argparse.Namespace):
    """The model that `add_model_args`' flags name; one that does not load is a one-line UsageError."""
    import mllm.loading

    try:
        return mllm.loading.load_model(
            args.model, device=args.device, quantization=quantization(args), backend=args.backend
        )
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UsageError(f"cannot load model {args.model!r}: {e}") from e


def load_engine(args: argparse.Namespace, **limits):
    """A ChatEngine (`mllm ui`, `mllm api`) over `load_model(args)`; `limits` are its queue sizes."""
    from app.engine import ChatEngine

    return ChatEngine.on_model_thread(lambda: load_model(args), name=args.model, **limits)


# ---- mllm chat ------------------------------------------------------------------------------------
def cmd_chat(argv: list[str]) -> int:
    p = Parser(prog="mllm chat", description="Chat about images in the terminal.")
    p.add_argument("prompt", nargs="?", help="ask once, stream the answer and exit; omit for an interactive chat")
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="an image (repeatable)")
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt")
    args = p.parse_args(argv)
    gen = _gen_config(args)
    # Read every image before the (slow) model load, so a typo fails in milliseconds.
    images = [_read_image(path) for path in args.image]
    from mllm.session import ChatSession

    session = ChatSession(load_model(args), system=args.system, gen=gen)
    if args.prompt is not None:
        _print_reply(session, args.prompt, images)
        return 0
    return _interactive(session, images)


def _gen_config(args: argparse.Namespace):
    from mllm.generation import GenerationConfig

    try:
        return GenerationConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        )
    except ValueError as e:
        raise UsageError(str(e)) from e


def _read_image(path: str):
    from mllm.image_processing import load_image

    try:
        return load_image(path)
    except ImageError as e:
        raise UsageError(str(e)) from e


def _print_reply(session, text: str, images: list) -> None:
    try:
        for piece in session.send(text, images):
            print(piece, end="", flush=True)
    except MLLMError as e:  # image count, over-long conversation ...
        raise UsageError(str(e)) from e
    print()


def _interactive(session, pending: list) -> int:
    print("mllm chat: /image FILE adds an image to your next message, /reset clears, /quit exits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            pending = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            try:
                pending.append(_read_image(line[len("/image") :].strip()))
                print(f"(image added; {len(pending)} waiting for your next message)", file=sys.stderr)
            except UsageError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        print("assistant> ", end="", flush=True)
        try:
            _print_reply(session, line, pending)
        except UsageError as e:
            print(f"\nerror: {e}", file=sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            print("\n(stopped)", file=sys.stderr)
        pending = []


# ---- the training package's commands --------------------------------------------------------------
def cmd_data(argv: list[str]) -> int:
    """`mllm data validate | convert | synth | views | photos ...`."""
    from training import formats, photo_eval, synth, synth_views, validate

    subcommands = {
        "validate": validate.main,
        "convert": formats.main,
        "synth": synth.main,
        "views": synth_views.main,
        "photos": photo_eval.main,
    }
    if not argv or argv[0] not in subcommands:
        raise UsageError(f"mllm data: choose a subcommand: {', '.join(subcommands)}")
    return subcommands[argv[0]](argv[1:])


def cmd_train(argv: list[str]) -> int:
    from training import train

    return train.main(argv)


def cmd_eval(argv: list[str]) -> int:
    from training import evaluate

    return evaluate.main(argv)


# ---- mllm convert / mllm export -------------------------------------------------------------------
def cmd_convert(argv: list[str]) -> int:
    """mllm convert --from {llava,blip2,instructblip} SRC OUT [--template NAME]"""
    from mllm.interop import convert
    from mllm.templates import NAMED_TEMPLATES

    p = Parser(
        prog="mllm convert",
        description="Import a transformers LLaVA / BLIP-2 / InstructBLIP checkpoint directory as an mllm checkpoint "
        "(tower and LLM weights are copied into OUT/vision and OUT/llm).",
    )
    p.add_argument("--from", dest="source", required=True, choices=["llava", "blip2", "instructblip"])
    p.add_argument("src", help="transformers checkpoint directory or hub id (e.g. llava-hf/llava-1.5-7b-hf)")
    p.add_argument("out", help="where to write the mllm checkpoint")
    p.add_argument(
        "--template",
        choices=sorted(NAMED_TEMPLATES),
        default=None,
        help="LLaVA only: a named chat template instead of the checkpoint's own",
    )
    args = p.parse_args(argv)
    src = local_path(args.src)  # a hub id: its downloaded snapshot
    return _print_written(p.prog, convert, src, args.out, source=args.source, template=args.template)


def cmd_export(argv: list[str]) -> int:
    """mllm export [CKPT] OUT --format hf-llava|gguf [--model NAME] [...]"""
    from mllm.interop.export import DTYPES, FORMATS

    p = Parser(
        prog="mllm export",
        description="Export a model for transformers / vLLM / SGLang (--format hf-llava: LlavaForConditionalGeneration) "
        "or for Ollama / llama.cpp / LM Studio (--format gguf: LLM GGUF + mmproj GGUF + Modelfile, checked in llama.cpp).",
    )
    p.add_argument("checkpoint", nargs="?", help="mllm checkpoint directory or hub id (or give --model)")
    p.add_argument("out", help="output directory")
    p.add_argument(
        "--model", default=None, help="the model as `mllm chat --model` takes it (a llava-hf dir or hub id too)"
    )
    p.add_argument("--format", required=True, choices=(*FORMATS, "gguf"))
    p.add_argument("--merge-lora", action="store_true", help="hf-llava: merge a LoRA adapter into the base weights")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="hf-llava: weights dtype")
    p.add_argument(
        "--type", default=None, help="gguf: the LLM's type, f16 | q8_0 | q4_0 (default: chosen by the check)"
    )
    p.add_argument("--mmproj-type", default="f16", help="gguf: the mmproj's type, f16 | f32")
    check = p.add_mutually_exclusive_group()
    check.add_argument("--check", dest="check", action="store_true", default=None, help="gguf: check in llama.cpp")
    check.add_argument("--no-check", dest="check", action="store_false", help="gguf: skip the llama.cpp check")
    args = p.parse_args(argv)
    if args.checkpoint is not None and args.model is not None:
        raise UsageError("mllm export: give the model once, as CKPT or --model")
    name = args.model or args.checkpoint or "default"
    if args.format == "gguf":
        from mllm.gguf_export import export_gguf

        try:
            result = export_gguf(name, args.out, llm_type=args.type, mmproj_type=args.mmproj_type, check=args.check)
        except (ValueError, OSError) as e:
            raise UsageError(f"{p.prog}: {e}") from e
        print(result.summary())
        return 0
    from mllm.interop import export_hf_llava

    return _print_written(
        p.prog, export_hf_llava, local_path(name), args.out, merge_lora=args.merge_lora, dtype=args.dtype
    )


def _print_written(prog: str, write: Callable[..., Path], *args, **kwargs) -> int:
    """Call `write(*args, **kwargs)` and print the directory it wrote; a bad source or target is one line."""
    try:
        out = write(*args, **kwargs)
    except (ValueError, OSError) as e:  # OSError: a missing source, an existing target, a full disk ...
        raise UsageError(f"{prog}: {e}") from e
    print(out)
    return 0


# ---- mllm ui / mllm api ---------------------------------------------------------------------------
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_ui(argv: list[str]) -> int:
    from app.api_request import MAX_IMAGE_BYTES

    p = Parser(prog="mllm ui", description="Chat with images in the browser.")
    add_model_args(p)
    add_server_args(p, port=7860)
    p.add_argument(
        "--auth",
        default=os.environ.get("MLLM_UI_AUTH"),
        metavar="USER:PASSWORD",
        help="require this login; MLLM_UI_AUTH=USER:PASSWORD does the same and keeps the password out of the "
        "process list",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=MAX_IMAGE_BYTES / 2**20,
        help="larger uploaded files are refused (default: the API's per-image limit)",
    )
    p.add_argument(
        "--chats-dir",
        default=None,
        metavar="DIR",
        help="where chats are saved, one JSON file each, and reopened from (default: ~/.cache/mllm/chats, or "
        "$MLLM_CACHE/chats)",
    )
    args = p.parse_args(argv)
    auth = _login(args.auth)
    if not 0 < args.max_upload_mb < float("inf"):  # nan and inf too
        raise UsageError("mllm ui: need a finite --max-upload-mb > 0")
    # Checked before Gradio is imported and the model loaded: a typo fails at once.
    from app.chat_store import ChatStore
    from app.scheduling import ChatError
    from app.ui import build, export_shelf, launch, make_examples
    from mllm.llm import cache_root

    try:  # an unusable folder fails before the model loads
        store = ChatStore(args.chats_dir or cache_root() / "chats")
    except ChatError as e:
        raise UsageError(f"mllm ui: --chats-dir: {e}") from e
    engine = load_engine(args)
    work = cache_root() / "ui"
    exports = export_shelf()
    demo = build(engine, make_examples(work / "examples"), exports=exports, store=store)
    _warn_if_open("mllm ui", args.host, "--auth", auth is not None)
    print(f"mllm ui: open http://{args.host}:{args.port} in your browser (Ctrl-C stops)", flush=True)
    # A service manager stops the server with SIGTERM: leave through `finally` then, as on Ctrl-C, so the exports go.
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        launch(demo, args.host, args.port, allowed=[work], auth=auth, max_file_size=int(args.max_upload_mb * 2**20))
    finally:
        signal.signal(signal.SIGTERM, previous)
        exports.close()
    return 0


def _exit(signum, frame) -> None:
    sys.exit(0)


def _login(value: str | None) -> tuple[str, str] | None:
    """`--auth` / MLLM_UI_AUTH as Gradio's (user, password); never echoed, it holds a password."""
    if value is None:
        return None
    user, _, password = value.partition(":")
    if not user.strip() or not password.strip():
        raise UsageError("mllm ui: --auth (or MLLM_UI_AUTH) must be USER:PASSWORD with neither part empty")
    return user, password


def _warn_if_open(prog: str, host: str, flag: str, protected: bool) -> None:
    if host not in LOOPBACK and not protected:
        print(f"{prog}: warning: listening on {host} without {flag}; anyone who can reach it can use it")


def cmd_api(argv: list[str]) -> int:
    p = Parser(
        prog="mllm api", description="Serve the model over an OpenAI-compatible HTTP API (and Ollama's, under /api)."
    )
    add_model_args(p)
    add_server_args(p, port=8000)
    p.add_argument("--api-key", default=os.environ.get("MLLM_API_KEY"), help="require this bearer token")
    p.add_argument("--allowed-image-dir", default=None, help="let requests name image files under this folder")
    p.add_argument("--max-concurrency", type=int, default=16, help="replies generated at once (decoded as one batch)")
    p.add_argument("--max-queue", type=int, default=32, help="requests that may wait; more get 503")
    p.add_argument("--max-body-mb", type=float, default=64, help="larger request bodies get 413")
    p.add_argument(
        "--prefix-cache-mib",
        type=float,
        default=256,
        help="KV memory kept for prompts that later requests extend (a re-sent history prefills only its new turn); 0: off",
    )
    p.add_argument(
        "--exact-batching",
        action="store_true",
        help="int4: batches of 8+ replies stay on the int4 kernel, each reply bit for bit what it would be alone "
        "(default: bf16 products there, 1.7x faster steps, replies may differ where two tokens nearly tie)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API from a browser; repeatable; none by default",
    )
    args = p.parse_args(argv)
    if args.api_key is not None and not args.api_key.strip():  # an empty bearer token would be the key
        raise UsageError("mllm api: --api-key (or MLLM_API_KEY) must not be empty")
    for origin in args.cors_origin:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise UsageError(f"mllm api: --cors-origin {origin!r} is not an origin; give scheme://host[:port], no path")
    if args.allowed_image_dir is not None and not Path(args.allowed_image_dir).is_dir():
        raise UsageError(f"mllm api: --allowed-image-dir {args.allowed_image_dir} is not a directory")
    if args.max_concurrency < 1 or args.max_queue < 0 or args.max_body_mb <= 0 or args.prefix_cache_mib < 0:
        raise UsageError(
            "mllm api: need --max-concurrency >= 1, --max-queue >= 0, --max-body-mb > 0 and --prefix-cache-mib >= 0"
        )
    import uvicorn

    from app.api import create_app

    engine = load_engine(
        args,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        prefix_cache_mib=args.prefix_cache_mib,
        exact_batching=args.exact_batching,
    )
    app = create_app(
        engine,
        api_key=args.api_key,
        allowed_image_dir=args.allowed_image_dir,
        max_body_bytes=int(args.max_body_mb * 2**20),
        cors_origins=args.cors_origin,
    )
    _warn_if_open("mllm api", args.host, "--api-key", args.api_key is not None)
    print(f"mllm api: serving {engine.model_id!r} at http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "chat": cmd_chat,
    "data": cmd_data,
    "train": cmd_train,
    "eval": cmd_eval,
    "convert": cmd_convert,
    "export": cmd_export,
    "ui": cmd_ui,
    "api": cmd_api,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: mllm {" + ",".join(COMMANDS) + "} [options]   (mllm COMMAND --help for details)")
        return 0 if argv else EXIT_USAGE
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"mllm: unknown command {argv[0]!r}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars are noise in a terminal chat
    return run(command, argv[1:], prog=f"mllm {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
