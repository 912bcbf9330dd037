"""The command-line front end every `mllm` command is built on: one parser class, the model flags, one runner.

A user error (a bad flag, a missing file, an unreadable image, a model that does not load) prints one
line on stderr and exits with status 2, never argparse's usage dump or a traceback. Commands raise
`UsageError` for their own checks; `run` also turns the library's typed errors (`MLLMError`) and missing
files into that one line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from mllm.backends import BACKENDS, GGUF_TYPES
from mllm.config import QUANTIZATIONS
from mllm.errors import MLLMError

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem the user can fix; printed as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage dump
        raise UsageError(f"{self.prog}: {message} (see --help)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --quantization (--load-4bit / --load-8bit), --device: the same flags on every command that loads
    a model."""
    p.add_argument(
        "--model",
        default="default",
        help="checkpoint directory, hub id, or a built-in model: 'default' (the demo model), 'default-qformer'",
    )
    quant = p.add_mutually_exclusive_group()
    quant.add_argument(
        "--quantization",
        choices=QUANTIZATIONS + GGUF_TYPES,
        default=None,
        help="int4: torch's int4 kernel (CPU); 4bit / 8bit: bitsandbytes (CUDA); none: full precision; with "
        "--backend llamacpp, the GGUF type: " + ", ".join(GGUF_TYPES) + " (default: what the checkpoint says)",
    )
    quant.add_argument("--load-4bit", action="store_true", help="same as --quantization 4bit (nf4, bitsandbytes)")
    quant.add_argument("--load-8bit", action="store_true", help="same as --quantization 8bit (bitsandbytes)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="what decodes: llamacpp (the LLM in llama.cpp, CPU), int4 (torch's int4 kernel, CPU), transformers "
        "(CUDA, bitsandbytes, full precision); auto: the measured CPU default, transformers on CUDA",
    )


def add_server_args(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to your network")
    p.add_argument("--port", type=int, default=port)


def quantization(args: argparse.Namespace) -> str | None:
    """The --quantization / --load-4bit / --load-8bit choice as `load_model`'s `quantization`."""
    return "4bit" if args.load_4bit else "8bit" if args.load_8bit else args.quantization


def run(main: Callable[[list[str]], int | None], argv: list[str] | None, prog: str = "mllm") -> int:
    """Call `main(argv)`; a user error becomes one line on stderr and exit status 2."""
    try:
        return int(main(sys.argv[1:] if argv is None else argv) or 0)
    except UsageError as e:
        print(str(e), file=sys.stderr)
    except (MLLMError, FileNotFoundError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
    except SystemExit as e:  # --help, and argparse's own exits
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    return EXIT_USAGE
