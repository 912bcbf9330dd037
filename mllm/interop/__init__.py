"""Interop with transformers' multimodal checkpoints.

Import: `load_transformers(path)` (also reached through `mllm.checkpoint.load_model(path)`) loads a llava-hf
`LlavaForConditionalGeneration`, `Blip2ForConditionalGeneration` or `InstructBlipForConditionalGeneration`
directory as an MLLM; `convert(src, out)` writes one as an mllm checkpoint. InstructBLIP's Q-Former reads each
image's instruction too: its connector has `qformer_text_input` and its processor a `qformer_tokenizer`.
Export: `export_hf_llava(checkpoint, out)` writes a `LlavaForConditionalGeneration` directory that
transformers, vLLM and SGLang load without custom code. `main_convert` / `main_export` are the CLI entry points.
"""

from mllm.interop.commands import main_convert, main_export
from mllm.interop.common import detect_format
from mllm.interop.export import export_hf_llava
from mllm.interop.importer import convert, load_transformers, plan_import

__all__ = [
    "convert",
    "detect_format",
    "export_hf_llava",
    "load_transformers",
    "main_convert",
    "main_export",
    "plan_import",
]
