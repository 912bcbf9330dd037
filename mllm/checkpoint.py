"""Checkpoint format (safetensors only, base weights referenced, never copied):

mllm_config.json        vision / connector / llm references, template name, image token, tune types
connector.safetensors   always
vision.safetensors      only if the tower was trained
adapter/                peft LoRA adapter, only if the LLM was LoRA/QLoRA-tuned
llm/                    full LLM weights, only if the LLM was fully tuned
template.jinja          the chat template the model was trained with
image_processor.json    image size / normalisation used in training
tokenizer files         including the image token
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from mllm.config import MLLMConfig
from mllm.connectors import build_connector
from mllm.llm import attach_lora, load_llm
from mllm.model import MLLM, make_processor, pick_device
from mllm.vision import build_vision

CONFIG_FILE = "mllm_config.json"
DEMO_DIR = Path(__file__).parent / "assets" / "demo"


def _state_dict_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def save_pretrained(model: MLLM, directory: str | Path) -> None:
    """Write `model` to `directory` atomically: a crash mid-save leaves any previous checkpoint intact."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        config = model.config.replace(tokens_per_image=model.tokens_per_image)
        config.save(tmp / CONFIG_FILE)
        save_file(_state_dict_cpu(model.connector), tmp / "connector.safetensors")
        tune = config.tune
        if tune.get("vision", "frozen") != "frozen":
            save_file(_state_dict_cpu(model.vision), tmp / "vision.safetensors")
        if tune.get("llm") in ("lora", "qlora"):
            model.llm.save_pretrained(tmp / "adapter", safe_serialization=True)
        elif tune.get("llm") == "full":
            model.llm.save_pretrained(tmp / "llm", safe_serialization=True)
        model.processor.save_pretrained(tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_pretrained(
    directory: str | Path,
    device: str | None = None,
    quantization: str | None = None,
    trainable: bool = False,
) -> MLLM:
    """Load a checkpoint directory. `quantization` (none | 8bit | 4bit) overrides the stored setting.

    For inference (`trainable=False`) a LoRA adapter on an unquantized LLM is merged into the
    weights, so decoding pays nothing for it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist; give an mllm checkpoint or 'default'")
    if not (directory / CONFIG_FILE).is_file():
        raise ValueError(
            f"{directory} is not an mllm checkpoint (no {CONFIG_FILE}); "
            "import llava-hf / BLIP-2 checkpoints with `mllm convert`"
        )
    config = MLLMConfig.load(directory / CONFIG_FILE)
    if quantization is not None:
        config = config.replace(llm=_replace(config.llm, quantization=quantization))
    device = pick_device(device)

    vision = build_vision(config.vision)
    if (directory / "vision.safetensors").is_file():
        vision.load_state_dict(load_file(directory / "vision.safetensors"))
    full_weights = directory / "llm"
    llm = load_llm(config.llm, device, weights_path=str(full_weights) if full_weights.is_dir() else None)
    if (directory / "adapter").is_dir():
        llm = attach_lora(llm, config.llm.lora, adapter_path=str(directory / "adapter"), trainable=trainable)
        if not trainable and config.llm.quantization == "none":
            llm = llm.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    llm_hidden = llm.get_input_embeddings().embedding_dim
    connector = build_connector(config.connector, vision.hidden_size, vision.num_tokens, llm_hidden)
    connector.load_state_dict(load_file(directory / "connector.safetensors"))
    if config.tokens_per_image is not None and config.tokens_per_image != connector.num_tokens:
        raise ValueError(
            f"{directory}: tokens_per_image={config.tokens_per_image} but the tower + connector give "
            f"{connector.num_tokens}; the checkpoint's config does not match its weights"
        )
    template = (directory / "template.jinja").read_text()
    processor = make_processor(config, tokenizer, vision, connector.num_tokens, template)
    return MLLM(config, vision, connector, llm, processor).place(device).eval()


def _replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def load_model(name: str = "default", device: str | None = None, quantization: str | None = None) -> MLLM:
    """`default` (the built-in demo model) or a checkpoint directory."""
    if name == "default":
        if (DEMO_DIR / CONFIG_FILE).is_file():
            return load_pretrained(DEMO_DIR, device=device, quantization=quantization)
        # No trained demo weights in this install: the default architecture with a seeded, untrained connector.
        torch.manual_seed(0)
        config = MLLMConfig()
        if quantization is not None:
            config = config.replace(llm=_replace(config.llm, quantization=quantization))
        return MLLM.build(config, device=device).eval()
    return load_pretrained(name, device=device, quantization=quantization)
