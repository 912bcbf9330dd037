"""Checkpoint format (safetensors only, base weights referenced, never copied):

mllm_config.json        vision / connector / llm references, template name, image token, tune types
connector.safetensors   always
vision.safetensors      only if the tower was trained
adapter/                peft LoRA adapter, only if the LLM was LoRA/QLoRA-tuned
llm/                    full LLM weights, only if the LLM was fully tuned
template.jinja          the chat template the model was trained with
image_processor.json    image size / normalisation used in training
tokenizer files         including the image token
vision/, llm/           base weights carried by converted checkpoints (`mllm convert`), referenced from
                        mllm_config.json as `./vision` / `./llm`: relative paths resolve against the checkpoint
qformer_tokenizer/      the Q-Former's instruction tokenizer, only with connector.qformer_text_input (InstructBLIP)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from mllm.config import SMOLLM2, MLLMConfig
from mllm.connectors import build_connector
from mllm.llm import attach_lora, load_llm
from mllm.model import MLLM, make_processor, pick_device
from mllm.processor import QFORMER_TOKENIZER_DIR
from mllm.vision import build_vision

CONFIG_FILE = "mllm_config.json"
DEMO_DIR = Path(__file__).parent / "assets" / "demo"


def _state_dict_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def swap_in(finished: Path, directory: Path) -> None:
    """Put a fully written `finished` directory at `directory`, replacing what was there.

    Two renames on one filesystem: a crash leaves either the old directory or the new one, never half.
    """
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(finished, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(finished, directory)


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
            _portable_adapter_config(tmp / "adapter" / "adapter_config.json", config.llm.path)
        elif tune.get("llm") == "full":
            model.llm.save_pretrained(tmp / "llm", safe_serialization=True)
        model.processor.save_pretrained(tmp)
        swap_in(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _portable_adapter_config(path: Path, llm_path: str) -> None:
    """Name the base LLM as the checkpoint's config does, not by this machine's cache path (the loader
    builds the base from mllm_config.json; the adapter's own field is for people and other tools)."""
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = llm_path
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


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
    config = read_config(directory, quantization)
    return assemble_checkpoint(directory, config, device=device, trainable=trainable)


def read_config(directory: str | Path, quantization: str | None = None) -> MLLMConfig:
    """The checkpoint's config, checkpoint-relative paths resolved, `quantization` applied if given."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist; give an mllm checkpoint or 'default'")
    if not (directory / CONFIG_FILE).is_file():
        raise ValueError(
            f"{directory} is not an mllm checkpoint (no {CONFIG_FILE}); "
            "import llava-hf / BLIP-2 checkpoints with `mllm convert`"
        )
    config = _resolve_paths(MLLMConfig.load(directory / CONFIG_FILE), directory)
    if quantization is not None:
        config = config.replace(llm=_replace(config.llm, quantization=quantization))
    return config


def _resolve_paths(config: MLLMConfig, directory: Path) -> MLLMConfig:
    """Relative `vision.path` / `llm.path` that exist inside the checkpoint (`./vision`, `./llm` of a converted
    checkpoint) become absolute, so the model loads from any working directory and a later save references them."""

    def resolve(path: str | None) -> str | None:
        if not path or path == SMOLLM2 or Path(path).is_absolute():
            return path
        inside = directory / path
        return str(inside.resolve()) if inside.exists() else path

    return config.replace(
        vision=_replace(config.vision, path=resolve(config.vision.path)),
        llm=_replace(config.llm, path=resolve(config.llm.path)),
    )


def assemble_checkpoint(
    directory: Path, config: MLLMConfig, device: str | None = None, trainable: bool = False
) -> MLLM:
    """Build the model of checkpoint `directory` described by `config` (see `read_config`)."""
    qformer_tokenizer = _qformer_tokenizer(directory, config)  # before the weights: fail fast
    device = pick_device(device)
    vision = build_vision(config.vision)
    if (directory / "vision.safetensors").is_file():
        vision.load_state_dict(load_file(directory / "vision.safetensors"))
    llm = _load_base_llm(directory, config, device)
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
    processor = make_processor(config, tokenizer, vision, connector.num_tokens, template, qformer_tokenizer)
    return MLLM(config, vision, connector, llm, processor).place(device).eval()


def _qformer_tokenizer(directory: Path, config: MLLMConfig):
    """The instruction tokenizer of a text-reading Q-Former (`qformer_tokenizer/`), else None."""
    folder = directory / QFORMER_TOKENIZER_DIR
    if not config.connector.qformer_text_input:
        if folder.is_dir():
            # Converted by an mllm whose config could not say the Q-Former reads text.
            raise ValueError(
                f"{directory} has {QFORMER_TOKENIZER_DIR}/ but its connector config lacks qformer_text_input; it "
                "was converted by an older mllm: convert the InstructBLIP checkpoint again with `mllm convert`"
            )
        return None
    if not folder.is_dir():
        raise ValueError(
            f"{directory}: connector.qformer_text_input is set but {QFORMER_TOKENIZER_DIR}/ (the Q-Former's "
            "instruction tokenizer) is missing; re-save the model with save_pretrained"
        )
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def _load_base_llm(directory: Path, config: MLLMConfig, device):
    """The checkpoint's own `llm/`, else `llm.path`: an LLM directory / hub id, or the LLM half of a
    LLaVA / BLIP-2 transformers directory (a model loaded straight from one and saved references it)."""
    if (directory / "llm").is_dir():
        return load_llm(config.llm, device, weights_path=str(directory / "llm"))
    from mllm.interop.common import detect_format, load_composite_llm

    path = config.llm.path
    fmt = detect_format(path) if Path(path).is_dir() else None
    if fmt is None:
        return load_llm(config.llm, device)
    from transformers import AutoConfig

    text_config = AutoConfig.from_pretrained(path, trust_remote_code=False).text_config
    return load_composite_llm(path, fmt, text_config, config.llm, device)


def _replace(cfg, **changes):
    return dataclasses.replace(cfg, **changes)


def load_model(name: str = "default", device: str | None = None, quantization: str | None = None) -> MLLM:
    """`default` (the built-in demo model), a checkpoint directory, or a transformers LLaVA / BLIP-2 /
    InstructBLIP directory."""
    if name == "default":
        if (DEMO_DIR / CONFIG_FILE).is_file():
            return load_pretrained(DEMO_DIR, device=device, quantization=quantization)
        # No trained demo weights in this install: the default architecture with a seeded, untrained connector.
        torch.manual_seed(0)
        config = MLLMConfig()
        if quantization is not None:
            config = config.replace(llm=_replace(config.llm, quantization=quantization))
        return MLLM.build(config, device=device).eval()
    path = Path(name)
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        # A released transformers LLaVA / BLIP-2 / InstructBLIP directory, recognised by its config.json (not its name).
        from mllm.interop.common import detect_format, read_hf_config

        if detect_format(path) is not None:
            from mllm.interop.importer import load_transformers

            return load_transformers(path, device=device, quantization=quantization)
        if (hf_config := read_hf_config(path)) is not None:
            raise ValueError(
                f"{path} is a transformers {hf_config.get('model_type', 'model')!r} checkpoint; mllm loads "
                "llava, blip-2 and instructblip ones (or mllm checkpoints, which have mllm_config.json)"
            )
    return load_pretrained(name, device=device, quantization=quantization)
