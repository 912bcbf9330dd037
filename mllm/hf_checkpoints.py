"""Reading transformers checkpoint directories: their config, their format, their weights, their dtype.

A multimodal directory is recognised by its `config.json` (`model_type`, then `architectures`), never by
its folder name. Weights are read from safetensors only: a directory with pickled `*.bin` weights alone is
refused with the command that re-saves it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.utils import logging as hf_logging

from mllm.errors import CheckpointError
from mllm.hub import require_safetensors

# config.json `model_type` / architecture -> our name for the format.
FORMATS: dict[str, str] = {"llava": "llava", "blip-2": "blip2", "instructblip": "instructblip"}
ARCHITECTURES: dict[str, str] = {
    "LlavaForConditionalGeneration": "llava",
    "Blip2ForConditionalGeneration": "blip2",
    "InstructBlipForConditionalGeneration": "instructblip",
}


def read_hf_config(path: str | Path) -> dict | None:
    """The parsed `config.json` of a local directory, or None if there is none."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); re-download or re-save the checkpoint") from e


def detect_format(path: str | Path) -> str | None:
    """`llava`, `blip2` or `instructblip` for a local transformers checkpoint directory of that kind, else None."""
    config = read_hf_config(path) if Path(path).is_dir() else None
    if config is None:
        return None
    if config.get("model_type") in FORMATS:
        return FORMATS[config["model_type"]]
    for arch in config.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    return None


def safetensors_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory; pickled weights are refused."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / name for name in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    require_safetensors(path)  # pickled weights alone: refused by name, with the command that converts them
    raise FileNotFoundError(f"{path} has no model.safetensors (or model.safetensors.index.json)")


def read_tensors(path: str | Path, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint whose key passes `keep`, read lazily shard by shard."""
    out = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if keep(key):
                    out[key] = f.get_tensor(key)
    return out


def saved_dtype(config) -> torch.dtype:
    """The dtype a (composite) transformers config says its weights were saved in; float32 if it does not say."""
    for cfg in (getattr(config, "text_config", None), config):
        dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return torch.float32


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' load reports while loading one half of a composite checkpoint: the other half is
    "unexpected" by design (the caller checks the missing keys itself)."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def forget_key_mapping(model: torch.nn.Module) -> torch.nn.Module:
    """Let `save_pretrained` write a model loaded through a `key_mapping` in its class's standard layout.

    transformers records the mapping used at load time and reverses it on save; ours map a composite
    checkpoint's prefixes away (not reversible), and the standalone model should not get them back anyway.
    """
    for module in model.modules():
        if hasattr(module, "_weight_conversions"):
            module._weight_conversions = None
    return model


def replaceable_output(path: Path) -> bool:
    """Whether an existing `path` may be overwritten by `mllm convert` / `mllm export`: an empty folder or one
    of their earlier outputs (an mllm checkpoint or a Llava export), never an unrelated folder or a source."""
    if not path.is_dir():
        return False
    ours = (path / "mllm_config.json").is_file() or (read_hf_config(path) or {}).get("model_type") == "llava"
    return ours or not any(path.iterdir())
