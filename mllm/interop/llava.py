"""Import a transformers `LlavaForConditionalGeneration` checkpoint (the llava-hf layout).

llava-hf                                   mllm
vision_tower (CLIP / SigLIP vision model)  vision: kind=hf, path=<checkpoint>, feature_layer=vision_feature_layer,
                                                   drop_cls = (vision_feature_select_strategy == "default")
multi_modal_projector.linear_1 / linear_2  connector: mlp2x_gelu, proj.0 / proj.2 (GELU in between)
language_model + lm_head                   llm: the same weights as an AutoModelForCausalLM
processor chat template                    template (wrapped to render our string content)
image_token_index, `<image>`               image_token (one placeholder = one image's tokens)
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoProcessor, AutoTokenizer, PretrainedConfig

from mllm.config import ConnectorConfig, LLMConfig, MLLMConfig, VisionConfig
from mllm.hf_checkpoints import read_tensors
from mllm.interop.chat_templates import chat_template_for
from mllm.interop.plan import ImportPlan, image_settings
from mllm.templates import resolve_template


def plan_llava(path: Path, hf_config: PretrainedConfig, template: str | None = None) -> ImportPlan:
    """`template`: a named template (chatml, vicuna_v1, ...) instead of the checkpoint's own."""
    layer = hf_config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(
            f"{path}: vision_feature_layer={layer} concatenates several layers; mllm's tower reads one layer"
        )
    strategy = hf_config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"{path}: unknown vision_feature_select_strategy={strategy!r} (expected default or full)")
    if hf_config.projector_hidden_act != "gelu":
        raise ValueError(
            f"{path}: projector_hidden_act={hf_config.projector_hidden_act!r}; mllm's mlp2x_gelu connector uses "
            "exact (erf) GELU, so only 'gelu' projectors import exactly"
        )

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    image_token = tokenizer.convert_ids_to_tokens(hf_config.image_token_index)
    if image_token is None or image_token == tokenizer.unk_token:
        raise ValueError(
            f"{path}: image_token_index={hf_config.image_token_index} is not a token of the checkpoint's tokenizer"
        )
    if template is not None:
        jinja = resolve_template(template, tokenizer)
    else:
        jinja = _source_chat_template(path, tokenizer)
        if not jinja:
            raise ValueError(f"{path} ships no chat template; pass one by name (--template vicuna_v1 | chatml | ...)")
    jinja = chat_template_for(tokenizer, jinja, image_token)
    tokenizer.chat_template = jinja

    image_size = hf_config.vision_config.image_size
    resize_mode, mean, std = image_settings(path, image_size)
    config = MLLMConfig(
        vision=VisionConfig(
            kind="hf",
            path=str(path),
            feature_layer=layer,
            drop_cls=strategy == "default",
            resize_mode=resize_mode,
            image_mean=mean,
            image_std=std,
        ),
        connector=ConnectorConfig(kind="mlp2x_gelu"),
        llm=LLMConfig(path=str(path)),
        template="auto",
        image_token=image_token,
    )
    marker = "multi_modal_projector."  # whatever layout prefix comes before it
    projector = {k.split(marker, 1)[1]: v for k, v in read_tensors(path, lambda k: marker in k).items()}
    return ImportPlan(
        fmt="llava",
        path=path,
        config=config,
        hf_config=hf_config,
        tokenizer=tokenizer,
        template=jinja,
        connector_state=_connector_state(projector, path),
    )


def _source_chat_template(path: Path, tokenizer) -> str | None:
    """The processor's chat template (what llava-hf ships), else the tokenizer's."""
    try:
        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=False)
        if getattr(processor, "chat_template", None):
            return processor.chat_template
    except (OSError, ValueError, TypeError):
        pass
    return tokenizer.chat_template


def _connector_state(projector: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    if "linear_1.weight" not in projector or "linear_2.weight" not in projector:
        raise ValueError(f"{path} has no multi_modal_projector.linear_1 / linear_2 weights")
    state = {}
    for ours, theirs in (("proj.0", "linear_1"), ("proj.2", "linear_2")):
        weight = projector[f"{theirs}.weight"]
        state[f"{ours}.weight"] = weight
        # multimodal_projector_bias=False checkpoints have no bias: a zero bias computes the same thing.
        state[f"{ours}.bias"] = projector.get(f"{theirs}.bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
    return state
