"""Config dataclasses: validation names the field and the allowed values; JSON round trip."""

from __future__ import annotations

import json

import pytest

from mllm.config import ConnectorConfig, LLMConfig, LoraConfig, MLLMConfig, VisionConfig


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: VisionConfig(kind="resnet"),
            r"vision.kind='resnet' is not valid; allowed values: efficientnet_lite0, hf",
        ),
        (lambda: VisionConfig(kind="hf"), "vision.path is required"),
        (lambda: VisionConfig(features="middle"), "vision.features"),
        (lambda: VisionConfig(resize_mode="stretch"), "vision.resize_mode='stretch'.*pad"),
        (lambda: VisionConfig(image_mean=(0.5, 0.5)), "vision.image_mean must have 3 values"),
        (lambda: ConnectorConfig(kind="perceiver"), "connector.kind='perceiver'.*linear, mlp2x_gelu, qformer"),
        (lambda: ConnectorConfig(kind="qformer", qformer_hidden_size=30, qformer_heads=4), "not divisible"),
        (lambda: LLMConfig(quantization="2bit"), "llm.quantization='2bit'.*none, 8bit, 4bit"),
        (lambda: LLMConfig(dtype="fp8"), "llm.dtype"),
        (lambda: LoraConfig(r=0), "llm.lora.r=0 must be > 0"),
        (lambda: MLLMConfig(tune={"llm": "half"}), "tune.llm='half'.*frozen, full, lora, qlora"),
        (lambda: MLLMConfig(tune={"decoder": "full"}), "unknown component 'decoder'"),
        (lambda: MLLMConfig.from_dict({"vision": {}, "bogus": 1}), r"unknown keys \['bogus'\]"),
    ],
)
def test_bad_values_raise_naming_field_and_choices(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_json_round_trip(tmp_path):
    config = MLLMConfig(
        vision=VisionConfig(kind="hf", path="openai/clip-vit-large-patch14-336", image_mean=(0.1, 0.2, 0.3)),
        connector=ConnectorConfig(kind="qformer", num_query_tokens=8),
        llm=LLMConfig(path="lmsys/vicuna-7b-v1.5", quantization="4bit", lora=LoraConfig(r=8)),
        template="vicuna_v1",
        tune={"vision": "frozen", "connector": "full", "llm": "qlora"},
    )
    config.save(tmp_path / "mllm_config.json")
    assert json.loads((tmp_path / "mllm_config.json").read_text())["llm"]["lora"]["r"] == 8
    assert MLLMConfig.load(tmp_path / "mllm_config.json") == config


def test_replace_never_mutates_the_callers_config():
    config = MLLMConfig()
    changed = config.replace(template="chatml")
    assert config.template == "auto" and changed.template == "chatml"


def test_broken_json_is_a_clear_error(tmp_path):
    (tmp_path / "mllm_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MLLMConfig.load(tmp_path / "mllm_config.json")
