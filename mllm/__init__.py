"""mllm: chat with images using a multimodal LLM, train your own, run it locally in 4-bit.

    from mllm import load_model, ChatSession

    model = load_model("default")          # or an mllm checkpoint / transformers LLaVA directory
    chat = ChatSession(model)
    print(chat.ask("What colour is the circle?", images=["shapes.png"]))

The names below are imported on first use, so `import mllm.config` (or `mllm --help`) does not load
torch's model stack.
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "MLLM": "mllm.model",
    "MLLMConfig": "mllm.config",
    "build_model": "mllm.assembly",
    "load_model": "mllm.loading",
    "load_processor": "mllm.loading",
    "load_pretrained": "mllm.checkpoint",
    "save_pretrained": "mllm.checkpoint",
    "Processor": "mllm.processor",
    "GenerationConfig": "mllm.generation",
    "generate": "mllm.generation",
    "stream": "mllm.generation",
    "ChatSession": "mllm.session",
    "MLLMError": "mllm.errors",
    "CheckpointError": "mllm.errors",
    "ContextLengthError": "mllm.errors",
    "GrammarError": "mllm.errors",
    "ImageError": "mllm.errors",
    "MessageError": "mllm.errors",
    "TooManyImagesError": "mllm.errors",
    "UnexportableError": "mllm.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mllm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
