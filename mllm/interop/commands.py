"""`mllm convert` and `mllm export`: argument parsing over `convert` / `export_hf_llava`, nothing else.

User errors print one line on stderr and return 2, as the rest of the CLI does.
"""

from __future__ import annotations

import argparse
import sys

from mllm.templates import NAMED_TEMPLATES

EXIT_USAGE = 2
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, OSError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage dump
        raise _Usage(f"{self.prog}: {message} (see --help)")


class _Usage(Exception):
    pass


def _run(parser: _Parser, argv: list[str], fn) -> int:
    """Parse, run `fn(args)` and print the directory it wrote."""
    try:
        out = fn(parser.parse_args(argv))
    except _Usage as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except _USER_ERRORS as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(out)
    return 0


def main_convert(argv: list[str]) -> int:
    """mllm convert --from {llava,blip2,instructblip} SRC OUT [--template NAME]"""
    p = _Parser(
        prog="mllm convert",
        description="Import a transformers LLaVA / BLIP-2 / InstructBLIP checkpoint directory as an mllm checkpoint "
        "(tower and LLM weights are copied into OUT/vision and OUT/llm).",
    )
    p.add_argument("--from", dest="source", required=True, choices=["llava", "blip2", "instructblip"])
    p.add_argument("src", help="transformers checkpoint directory (e.g. a llava-hf/llava-1.5-7b-hf snapshot)")
    p.add_argument("out", help="where to write the mllm checkpoint")
    p.add_argument(
        "--template",
        choices=sorted(NAMED_TEMPLATES),
        default=None,
        help="LLaVA only: a named chat template instead of the checkpoint's own",
    )

    def convert(args):
        from mllm.interop.importer import convert

        return convert(args.src, args.out, source=args.source, template=args.template)

    return _run(p, argv, convert)


def main_export(argv: list[str]) -> int:
    """mllm export CKPT OUT --format hf-llava [--merge-lora] [--dtype auto|float32|float16|bfloat16]"""
    from mllm.interop.export import DTYPES, FORMATS

    p = _Parser(
        prog="mllm export",
        description="Export an mllm checkpoint for transformers / vLLM / SGLang (LlavaForConditionalGeneration).",
    )
    p.add_argument("checkpoint", help="mllm checkpoint directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into the base weights")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weights dtype (auto: the base LLM's)")

    def export(args):
        from mllm.interop.export import export_hf_llava

        return export_hf_llava(args.checkpoint, args.out, merge_lora=args.merge_lora, dtype=args.dtype)

    return _run(p, argv, export)
