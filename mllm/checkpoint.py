"""The mllm checkpoint format (safetensors only, base weights referenced, never copied):

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
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mllm.assembly import assemble
from mllm.atomic import atomic_directory, recover
from mllm.config import CONFIG_FILE, SMOLLM2, MLLMConfig
from mllm.errors import CheckpointError
from mllm.model import MLLM
from mllm.processor import read_text_parts


def _state_dict_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def save_pretrained(model: MLLM, directory: str | Path) -> None:
    """Write `model` to `directory` atomically: a crash mid-save leaves any previous checkpoint intact."""
    with atomic_directory(directory) as tmp:
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
    backend: str = "auto",
    gguf_type: str | None = None,
) -> MLLM:
    """Load a checkpoint directory. `quantization` (none | 8bit | 4bit) overrides the stored setting; `backend`
    and `gguf_type`: what decodes (`mllm.assembly.assemble`).

    For inference (`trainable=False`) a LoRA adapter on an unquantized LLM is merged into the
    weights, so decoding pays nothing for it.
    """
    directory = Path(directory)
    config = read_config(directory, quantization)
    tokenizer, template, qformer_tokenizer = read_text_parts(directory, config)  # before the weights: fail fast
    optional = {name: directory / name for name in ("vision.safetensors", "llm", "adapter")}
    present = {name: path for name, path in optional.items() if path.exists()}
    return assemble(
        config,
        tokenizer,
        template,
        device,
        qformer_tokenizer=qformer_tokenizer,
        vision_state=load_file(present["vision.safetensors"]) if "vision.safetensors" in present else None,
        connector_state=load_file(directory / "connector.safetensors"),
        llm_weights=present.get("llm"),
        adapter=present.get("adapter"),
        trainable=trainable,
        backend=backend,
        gguf_type=gguf_type,
    )


def read_config(directory: str | Path, quantization: str | None = None) -> MLLMConfig:
    """The checkpoint's config, checkpoint-relative paths resolved, `quantization` applied if given."""
    directory = Path(directory)
    recover(directory)  # a kill between the two renames of a save left it as .NAME.old
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist; give an mllm checkpoint or 'default'")
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{directory} is not an mllm checkpoint (no {CONFIG_FILE}); "
            "import llava-hf / BLIP-2 checkpoints with `mllm convert`"
        )
    config = _resolve_paths(MLLMConfig.load(directory / CONFIG_FILE), directory)
    return config if quantization is None else with_quantization(config, quantization)


def with_quantization(config: MLLMConfig, quantization: str) -> MLLMConfig:
    """`config` with its LLM loaded in `quantization` (none | 8bit | 4bit | int4)."""
    return config.replace(llm=dataclasses.replace(config.llm, quantization=quantization))


def _resolve_paths(config: MLLMConfig, directory: Path) -> MLLMConfig:
    """Relative `vision.path` / `llm.path` that exist inside the checkpoint (`./vision`, `./llm` of a converted
    checkpoint) become absolute, so the model loads from any working directory and a later save references them."""

    def resolve(path: str | None) -> str | None:
        if not path or path == SMOLLM2 or Path(path).is_absolute():
            return path
        inside = directory / path
        return str(inside.resolve()) if inside.exists() else path

    return config.replace(
        vision=dataclasses.replace(config.vision, path=resolve(config.vision.path)),
        llm=dataclasses.replace(config.llm, path=resolve(config.llm.path)),
    )
