"""Interop with transformers' multimodal checkpoints.

Import: `load_transformers(path)` (also reached through `mllm.checkpoint.load_model(path)`) loads a llava-hf
`LlavaForConditionalGeneration` or a `Blip2ForConditionalGeneration` directory as an MLLM; `convert(src, out)`
writes one as an mllm checkpoint; `InstructBlip` runs InstructBLIP (its Q-Former reads the instruction too).
Export: `export_hf_llava(checkpoint, out)` writes a `LlavaForConditionalGeneration` directory that
transformers, vLLM and SGLang load without custom code. `main_convert` / `main_export` are the CLI entry points.
"""

from mllm.interop.commands import main_convert, main_export
from mllm.interop.common import detect_format
from mllm.interop.export import export_hf_llava
from mllm.interop.importer import convert, load_transformers, plan_import
from mllm.interop.instructblip import InstructBlip

__all__ = [
    "InstructBlip",
    "convert",
    "detect_format",
    "export_hf_llava",
    "load_transformers",
    "main_convert",
    "main_export",
    "plan_import",
]
