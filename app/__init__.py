"""Serving: `engine` (ChatEngine: sessions, streaming, cancel, the queue), `ui` (Gradio), `api` (OpenAI HTTP).

Beside them: `scheduling` and `conversation` (the engine's locking / queue and per-conversation state),
`api_request` and `api_stream` (the API's request parsing / errors and its SSE or JSON replies).

The command-line pieces that `mllm ui` and `mllm api` share live here: the same model flags as
`mllm chat`, and one-line errors with exit status 2 instead of argparse's usage dump.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem the user can fix; printed as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see --help)")


def add_model_args(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--model", default="default", help="checkpoint directory, or 'default' (built-in demo model)")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--load-4bit", action="store_true", help="load the LLM in 4-bit (nf4, bitsandbytes)")
    quant.add_argument("--load-8bit", action="store_true", help="load the LLM in 8-bit (bitsandbytes)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to your network")
    p.add_argument("--port", type=int, default=port)


def load_engine(args: argparse.Namespace, **limits):
    from app.engine import ChatEngine

    quantization = "4bit" if args.load_4bit else "8bit" if args.load_8bit else None
    try:
        return ChatEngine.load(args.model, device=args.device, quantization=quantization, **limits)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UsageError(f"cannot load model {args.model!r}: {e}") from e


def run(main: Callable[[list[str]], int], argv: list[str] | None) -> int:
    """Call `main`, turning a UsageError into one line on stderr and exit status 2."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_USAGE
