"""Training stages as data: per component `frozen | full | lora | qlora` and a learning rate, plus the
objective, the data kind and the optimisation settings. Presets follow the papers (LLaVA-1.5, BLIP-2);
YAML files in `training/configs/` override them, `--set key=value` overrides those.

`build_model` turns a stage into a ready-to-train MLLM: it loads (or builds) the model, quantizes the
LLM for QLoRA, attaches LoRA, sets `requires_grad` per component and keeps trainable weights in
float32 (bf16 compute comes from autocast, so Adam updates are not rounded away).

The stage config, presets and YAML loading live in `training.stage_config`; applying a stage to a
model (freezing, LoRA / QLoRA, the objective, optimizer groups) in `training.stage_model`. Both are
re-exported here, the import path the rest of the code uses.
"""

from __future__ import annotations

from training.stage_config import (
    COMPONENTS,
    CONFIG_DIR,
    DATA_KINDS,
    DEFAULT_LLM_LR,
    OBJECTIVES,
    PRESETS,
    StageConfig,
    load_stage,
)
from training.stage_model import apply_stage, build_model, build_objective, param_groups

__all__ = [
    "COMPONENTS",
    "CONFIG_DIR",
    "DATA_KINDS",
    "DEFAULT_LLM_LR",
    "OBJECTIVES",
    "PRESETS",
    "StageConfig",
    "apply_stage",
    "build_model",
    "build_objective",
    "load_stage",
    "param_groups",
]
