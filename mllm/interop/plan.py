"""An import plan: everything needed to assemble an MLLM from a transformers multimodal checkpoint.

A format module (`llava`, `blip2`) reads the source's config, tokenizer and image processor and fills a
plan; `assemble` then builds the model the same way whatever the format: tower and LLM loaded by path
from the source directory (only their own tensors), connector weights renamed onto our connector.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoImageProcessor, PretrainedConfig, PreTrainedTokenizerBase

from mllm.config import RESIZE_MODES, MLLMConfig
from mllm.connectors import Connector, build_connector
from mllm.interop.common import load_composite_llm
from mllm.model import MLLM, make_processor, pick_device
from mllm.vision import build_vision


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
    connector_setup: Callable[[Connector], None] | None = None
    """Adjusts the built connector before its weights are loaded (e.g. a LayerNorm epsilon)."""
    qformer_tokenizer: PreTrainedTokenizerBase | None = None
    """InstructBLIP's Q-Former (BERT) tokenizer for the instructions; None for the other formats."""


def assemble(plan: ImportPlan, device: str | torch.device | None = None, llm_dtype: torch.dtype | None = None) -> MLLM:
    """Build the MLLM the plan describes. `llm_dtype` keeps the LLM in a given dtype (conversion)."""
    device = pick_device(device)
    config = plan.config
    vision = build_vision(config.vision)
    llm = load_composite_llm(plan.path, plan.fmt, plan.hf_config.text_config, config.llm, device, dtype=llm_dtype)
    llm_hidden = llm.get_input_embeddings().embedding_dim
    connector = build_connector(config.connector, vision.hidden_size, vision.num_tokens, llm_hidden)
    if plan.connector_setup is not None:
        plan.connector_setup(connector)
    connector.load_state_dict(plan.connector_state)  # strict: every weight accounted for, no leftovers
    processor = make_processor(
        config, plan.tokenizer, vision, connector.num_tokens, plan.template, plan.qformer_tokenizer
    )
    model = MLLM(config.replace(tokens_per_image=connector.num_tokens), vision, connector, llm, processor)
    return model.place(device).eval()


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
