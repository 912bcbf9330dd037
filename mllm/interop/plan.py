"""An import plan: everything `mllm.assembly.assemble` needs to build an MLLM from a transformers multimodal
checkpoint, and the image settings that reproduce the source's image processor.

A format module (`llava`, `blip2`) reads the source's config, tokenizer and image processor and fills a
plan: our config (tower and LLM referenced by the source directory's path: only their own tensors are
read), the chat template, and the connector's weights renamed from the source's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoImageProcessor, PretrainedConfig, PreTrainedTokenizerBase

from mllm.config import RESIZE_MODES, MLLMConfig


@dataclass
class ImportPlan:
    fmt: str
    """`llava`, `blip2` or `instructblip`."""
    path: Path
    """The source checkpoint directory."""
    config: MLLMConfig
    """Our config; `vision.path` and `llm.path` name the source directory itself."""
    hf_config: PretrainedConfig
    """The source's composite config (`text_config` is the LLM's)."""
    tokenizer: PreTrainedTokenizerBase
    """The LLM tokenizer, with the image token and `chat_template` set to `template`."""
    template: str
    """The chat template our processor renders (reproduces the source processor's token layout)."""
    connector_state: dict[str, torch.Tensor]
    """Our connector's state dict, renamed from the source's tensors."""
    qformer_tokenizer: PreTrainedTokenizerBase | None = None
    """InstructBLIP's Q-Former (BERT) tokenizer for the instructions; None for the other formats."""


def _size(value, key: str):
    if value is None:
        return None
    return getattr(value, key, None) if not isinstance(value, dict) else value.get(key)


def image_settings(path: str | Path, image_size: int) -> tuple[str, tuple, tuple]:
    """(resize_mode, image_mean, image_std) reproducing the checkpoint's image processor.

    - LlavaImageProcessor with `do_pad`: pad to a square with the mean colour, resize -> `pad`.
    - A fixed `height` x `width` resize (BLIP-2 / InstructBLIP's BlipImageProcessor) -> `resize`.
    - Shortest side resize + centre crop (llava-hf's CLIPImageProcessor) -> `crop` when this mllm has it.
    """
    try:
        proc = AutoImageProcessor.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} has no loadable image processor (preprocessor_config.json): {e}") from e
    mean, std = tuple(float(v) for v in proc.image_mean), tuple(float(v) for v in proc.image_std)
    if abs(float(getattr(proc, "rescale_factor", 1 / 255)) - 1 / 255) > 1e-9 or not getattr(proc, "do_normalize", True):
        raise ValueError(f"{path}: the image processor does not rescale by 1/255 and normalise; mllm can't match it")
    if int(getattr(proc, "resample", 3)) != 3:
        warnings.warn(
            f"{path}: the image processor resamples with PIL filter {proc.resample}; mllm resizes with bicubic (3), "
            "so pixel values differ slightly",
            stacklevel=2,
        )
    size, crop = proc.size, getattr(proc, "crop_size", None)
    crops = bool(getattr(proc, "do_center_crop", False))
    if getattr(proc, "do_pad", False):
        mode = "pad"
    elif _size(size, "height") == _size(size, "width") == image_size and not (
        crops and (_size(crop, "height"), _size(crop, "width")) != (image_size, image_size)
    ):
        mode = "resize"
    elif _size(size, "shortest_edge") == image_size and crops and _size(crop, "height") == _size(crop, "width"):
        mode = "crop"
    else:
        raise ValueError(
            f"{path}: image processor size={size} crop_size={crop} does not produce {image_size}x{image_size} "
            "images the way mllm can (pad, resize or shortest-side resize + centre crop)"
        )
    if mode == "pad" and any(int(m * 255) != round(m * 255) for m in mean):
        warnings.warn(
            f"{path}: the source pads with int(mean * 255), mllm with round(mean * 255): padded borders of "
            "non-square images differ by one grey level",
            stacklevel=2,
        )
    if mode == "crop" and "crop" not in RESIZE_MODES:
        warnings.warn(
            f"{path}: the source resizes the shortest side and centre-crops; this mllm has no `crop` resize mode yet, "
            "so non-square images are stretched instead (square images are identical)",
            stacklevel=2,
        )
        mode = "resize"
    return mode, mean, std
