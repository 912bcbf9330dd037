"""`mllm` command line: a name -> function map over typed library calls; nothing is computed here.

User errors (bad flags, missing or unreadable images, bad model paths) print one line on stderr
and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from mllm.image_processing import ImageError, load_image

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem the user can fix; printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage dump
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="checkpoint directory, or 'default' (built-in demo model)")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--load-4bit", action="store_true", help="load the LLM in 4-bit (nf4, bitsandbytes)")
    quant.add_argument("--load-8bit", action="store_true", help="load the LLM in 8-bit (bitsandbytes)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def _quantization(args) -> str | None:
    return "4bit" if args.load_4bit else "8bit" if args.load_8bit else None


def _load(args):
    from mllm.checkpoint import load_model

    try:
        return load_model(args.model, device=args.device, quantization=_quantization(args))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UsageError(f"cannot load model {args.model!r}: {e}") from e


def _gen_config(args):
    from mllm.generation import GenerationConfig

    try:
        return GenerationConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        )
    except ValueError as e:
        raise UsageError(str(e)) from e


def cmd_chat(argv: list[str]) -> int:
    p = _Parser(prog="mllm chat", description="Chat about images in the terminal.")
    p.add_argument("prompt", nargs="?", help="ask once, stream the answer and exit; omit for an interactive chat")
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="an image (repeatable)")
    _add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt")
    args = p.parse_args(argv)
    gen = _gen_config(args)
    # Read every image before the (slow) model load, so a typo fails in milliseconds.
    images = [_read_image(path) for path in args.image]
    model = _load(args)
    from mllm.session import ChatSession

    session = ChatSession(model, system=args.system, gen=gen)
    if args.prompt is not None:
        _print_reply(session, args.prompt, images)
        return 0
    return _interactive(session, images)


def _read_image(path: str):
    try:
        return load_image(path)
    except ImageError as e:
        raise UsageError(str(e)) from e


def _print_reply(session, text: str, images: list) -> None:
    try:
        for piece in session.send(text, images):
            print(piece, end="", flush=True)
    except ValueError as e:  # image count, over-long conversation ...
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


def cmd_data(argv: list[str]) -> int:
    """`mllm data validate ...` / `mllm data synth ...` (the training package's entry points)."""
    subcommands = {"validate": "training.validate", "synth": "training.synth"}
    if not argv or argv[0] not in subcommands:
        raise UsageError(f"mllm data: choose a subcommand: {', '.join(subcommands)}")
    return _run_module(subcommands[argv[0]], argv[1:])


def cmd_train(argv: list[str]) -> int:
    return _run_module("training.train", argv)


def cmd_eval(argv: list[str]) -> int:
    return _run_module("training.evaluate", argv)


def cmd_convert(argv: list[str]) -> int:
    from mllm.interop import main_convert

    return main_convert(argv)


def cmd_export(argv: list[str]) -> int:
    from mllm.interop import main_export

    return main_export(argv)


def cmd_ui(argv: list[str]) -> int:
    return _run_module("app.ui", argv)


def cmd_api(argv: list[str]) -> int:
    return _run_module("app.api", argv)


def _run_module(module: str, argv: list[str]) -> int:
    import importlib

    try:
        return int(importlib.import_module(module).main(argv) or 0)
    except SystemExit as e:  # argparse inside those modules exits; keep its status
        return e.code if isinstance(e.code, int) else EXIT_USAGE


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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars are noise in a terminal chat
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"mllm: unknown command {argv[0]!r}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return command(argv[1:])
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
