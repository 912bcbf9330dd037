"""4-bit and 8-bit loading through bitsandbytes on CPU; the tower and connector stay unquantized."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mllm.assembly import build_model
from mllm.config import LLMConfig
from mllm.generation import GenerationConfig, stream

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("quantization, layer_type", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_llm_loads_and_generates_on_cpu(tiny_config, images, quantization, layer_type):
    config = tiny_config.replace(llm=LLMConfig(path=tiny_config.llm.path, quantization=quantization))
    torch.manual_seed(0)
    model = build_model(config, device="cpu").eval()
    q_proj = model.llm.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer_type
    assert all(type(m).__name__ not in ("Linear4bit", "Linear8bitLt") for m in model.connector.modules())
    assert all(p.dtype == torch.float32 for p in model.vision.parameters())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color"}]}]
    reply_ids = []
    for piece in stream(model, messages, images[:1], gen=GenerationConfig(max_new_tokens=5)):
        reply_ids.append(piece)
    batch = model.processor.collate(
        [model.processor.encode(messages + [{"role": "assistant", "content": "red"}], images[:1])]
    )
    with torch.no_grad():
        logits, loss = model(**batch)
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    from mllm.batch_decode import transformers_batch

    # 4-bit decodes a batch in one forward; LLM.int8()'s outlier columns would let rows change each other.
    assert (transformers_batch(model.llm) is not None) == (quantization == "4bit")


def test_quantized_logits_stay_close_to_full_precision(tiny_config, images):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color"}]}]
    results = {}
    for quantization in ("none", "8bit"):
        config = tiny_config.replace(llm=LLMConfig(path=tiny_config.llm.path, quantization=quantization))
        torch.manual_seed(0)
        model = build_model(config, device="cpu").eval()
        batch = model.processor.collate([model.processor.encode(messages, images[:1], add_generation_prompt=True)])
        with torch.no_grad():
            results[quantization] = model(batch["input_ids"], pixel_values=batch["pixel_values"])[0].softmax(-1)
    assert (results["none"] - results["8bit"]).abs().max() < 0.05


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_load_releases_the_full_precision_file(tiny_llama_dir, tmp_path, quantization):
    # The unquantized tensors (embeddings, norms) must not stay views of the float32 checkpoint's file
    # mapping: that kept every page the quantizer read resident, more RSS than loading in float32.
    import shutil

    from mllm.llm import load_llm

    llm_dir = shutil.copytree(tiny_llama_dir, tmp_path / "llm")  # a path no other test has mapped
    model = load_llm(LLMConfig(path=str(llm_dir), quantization=quantization), "cpu")
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(llm_dir) in line]
    assert mapped == []
    assert torch.isfinite(model.get_input_embeddings().weight).all()
