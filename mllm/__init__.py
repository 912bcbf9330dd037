"""mllm: chat with images using a multimodal LLM, train your own, run it locally in 4-bit.

from mllm import load_model, ChatSession

model = load_model("default")          # or an mllm checkpoint / transformers LLaVA directory
chat = ChatSession(model)
print(chat.ask("What colour is the circle?", images=["shapes.png"]))
"""

from mllm.assembly import build_model
from mllm.checkpoint import load_pretrained, save_pretrained
from mllm.config import MLLMConfig
from mllm.errors import (
    CheckpointError,
    ContextLengthError,
    ImageError,
    MessageError,
    MLLMError,
    TooManyImagesError,
)
from mllm.generation import GenerationConfig, generate, stream
from mllm.loading import load_model, load_processor
from mllm.model import MLLM
from mllm.processor import Processor
from mllm.session import ChatSession

__all__ = [
    "MLLM",
    "ChatSession",
    "CheckpointError",
    "ContextLengthError",
    "GenerationConfig",
    "ImageError",
    "MLLMConfig",
    "MLLMError",
    "MessageError",
    "Processor",
    "TooManyImagesError",
    "build_model",
    "generate",
    "load_model",
    "load_pretrained",
    "load_processor",
    "save_pretrained",
    "stream",
]
