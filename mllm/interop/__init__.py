"""Interop with transformers' multimodal checkpoints.

Import: `load_transformers(path)` loads a llava-hf `LlavaForConditionalGeneration`, `Blip2ForConditionalGeneration`
or `InstructBlipForConditionalGeneration` directory as an MLLM; `convert(src, out)` writes one as an mllm
checkpoint. InstructBLIP's Q-Former reads each image's instruction too: its connector has `qformer_text_input` and
its processor a `qformer_tokenizer`. Export: `export_hf_llava(checkpoint, out)` writes a
`LlavaForConditionalGeneration` directory that transformers, vLLM and SGLang load without custom code.
"""

from mllm.interop.export import export_hf_llava
from mllm.interop.importer import convert, load_transformers, plan_import

__all__ = ["convert", "export_hf_llava", "load_transformers", "plan_import"]
