"""The one place a model is put together: vision tower + connector + LLM + processor -> MLLM.

Every source of a model goes through `assemble`: a fresh build from a config (`build_model`), an mllm
checkpoint (`mllm.checkpoint`), and a transformers LLaVA / BLIP-2 / InstructBLIP directory
(`mllm.interop`). A source says where the weights are; `assemble` loads the tower and the LLM, builds the
connector, loads its weights (strict: every tensor accounted for), makes the processor from the tower's
image settings and places tower and connector on the LLM's device and compute dtype.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from mllm.backends import select as select_backend
from mllm.classifier_view import ClassifierView
from mllm.config import MLLMConfig
from mllm.connectors import build_connector
from mllm.cpu_quant import quantize_int4
from mllm.errors import CheckpointError, MLLMError
from mllm.image_processing import ImageProcessor
from mllm.llm import attach_lora, load_llm, load_tokenizer
from mllm.model import MLLM
from mllm.processor import Processor, tokenizer_limit
from mllm.templates import resolve_template
from mllm.vision import build_vision


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`auto` / None: CUDA when there is one, else the CPU; an explicit CUDA device must exist."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MLLMError(f"device {device} was asked for but CUDA is not available; use --device cpu")
    return device


def assemble(
    config: MLLMConfig,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    device: str | torch.device | None = None,
    *,
    qformer_tokenizer: PreTrainedTokenizerBase | None = None,
    vision_state: dict[str, torch.Tensor] | None = None,
    connector_state: dict[str, torch.Tensor] | None = None,
    llm_weights: str | Path | None = None,
    llm_dtype: torch.dtype | None = None,
    adapter: str | Path | None = None,
    fresh_adapter: bool = False,
    trainable: bool = False,
    backend: str = "auto",
    gguf_type: str | None = None,
) -> MLLM:
    """The MLLM that `config` describes, with these weights.

    `vision_state` / `connector_state`: the tower's / connector's weights (None: the tower's pretrained
    ones, a freshly initialised connector). `llm_weights`: a directory holding fully-tuned LLM weights
    instead of `config.llm.path`'s; `llm_dtype` keeps the LLM in a given dtype (conversion). LoRA: a saved
    `adapter` directory (merged into the weights for inference on an unquantized LLM, so decoding pays
    nothing for it; `int4` keeps it beside the 4-bit weights), or `fresh_adapter`s as `config.llm.lora` describes. `trainable`: train mode, adapters
    kept apart; otherwise eval mode. `backend` (`mllm.backends`): what decodes; with `llamacpp` the LLM runs in
    llama.cpp as a GGUF of `gguf_type` (the adapter applied there at run time) and the torch LLM, unquantized,
    gives only the input embeddings.
    """
    if config.llm.quantization == "int4" and trainable:
        raise CheckpointError("int4 is an inference format; train a quantized LLM with qlora (4-bit + LoRA)")
    device = pick_device(device)
    vision = build_vision(config.vision)
    if vision_state is not None:
        vision.load_state_dict(vision_state)
    if backend == "llamacpp":
        if trainable:
            raise CheckpointError("backend 'llamacpp' is for inference; train with the torch backends")
        config = config.replace(llm=dataclasses.replace(config.llm, quantization="none"))
    llm = load_llm(config.llm, device, weights_path=None if llm_weights is None else str(llm_weights), dtype=llm_dtype)
    if adapter is not None and backend == "llamacpp":
        pass  # applied by llama.cpp at run time; the torch LLM gives input embeddings, which LoRA leaves alone
    elif adapter is not None:
        llm = attach_lora(llm, config.llm.lora, adapter_path=str(adapter), trainable=trainable)
        if not trainable and config.llm.quantization == "none":
            llm = llm.merge_and_unload()  # decoding then pays nothing for the adapter
        # int4 keeps the adapter beside the 4-bit base (mllm.cpu_quant says why); bitsandbytes keeps it too.
    elif fresh_adapter:
        llm = attach_lora(llm, config.llm.lora)
    if config.llm.quantization == "int4":
        llm = quantize_int4(llm)
    llm_hidden = llm.get_input_embeddings().embedding_dim
    connector = build_connector(config.connector, vision.hidden_size, vision.num_tokens, llm_hidden)
    if connector_state is not None:
        connector.load_state_dict(connector_state)  # strict: every weight accounted for, no leftovers
    view = None
    if config.vision.classifier_view:  # the tower's ImageNet classifier, read as words (mllm.classifier_view)
        view = ClassifierView(*vision.imagenet_classifier(), tokenizer, config.vision.classifier_view)
    tokens_per_image = connector.num_tokens + (view.num_tokens if view is not None else 0)
    if config.tokens_per_image is not None and config.tokens_per_image != tokens_per_image:
        raise CheckpointError(
            f"tokens_per_image={config.tokens_per_image} but the tower + connector give {tokens_per_image}; "
            "the checkpoint's config does not match its weights"
        )
    # One source of truth for the context length: the config, else the tokenizer's limit, else the LLM's.
    context_length = config.context_length or tokenizer_limit(tokenizer) or llm.config.max_position_embeddings
    config = config.replace(tokens_per_image=tokens_per_image, context_length=context_length)
    image_processor = ImageProcessor(
        image_size=vision.image_size,
        image_mean=tuple(vision.image_mean),
        image_std=tuple(vision.image_std),
        resize_mode=config.vision.resize_mode,
    )
    processor = Processor.for_model(config, tokenizer, template, image_processor, tokens_per_image, qformer_tokenizer)
    model = MLLM(config, vision, connector, llm, processor, view).place(device).train(trainable)
    llamacpp = {"adapter": adapter, "llm_weights": llm_weights, "gguf_type": gguf_type} if backend == "llamacpp" else {}
    model.backend = select_backend(model, backend, **llamacpp)
    if backend == "llamacpp":
        # llama.cpp runs the blocks; torch keeps only the input embeddings the prompt is built from (the
        # default model's float32 blocks would hold ~430 MB for nothing).
        llm.get_decoder().layers = torch.nn.ModuleList()
    return model


def build_model(
    config: MLLMConfig,
    device: str | torch.device | None = None,
    qformer_tokenizer: PreTrainedTokenizerBase | None = None,
    trainable: bool = True,
    **backend,
) -> MLLM:
    """Pretrained tower and LLM, a freshly initialised connector (and fresh LoRA if configured), to train.

    `qformer_tokenizer`: the instruction tokenizer, required when `config.connector.qformer_text_input`.
    """
    tokenizer = load_tokenizer(config.llm.path)
    template = resolve_template(config.template, tokenizer)
    return assemble(
        config,
        tokenizer,
        template,
        device,
        qformer_tokenizer=qformer_tokenizer,
        fresh_adapter=config.llm.lora is not None,
        trainable=trainable,
        **backend,
    )
