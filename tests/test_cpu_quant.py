"""The int4 CPU path (`mllm.cpu_quant`): the layer's arithmetic, the LoRA side path, and a whole model loaded
with `quantization="int4"`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mllm.assembly import build_model
from mllm.checkpoint import save_pretrained
from mllm.commandline import Parser, UsageError, add_model_args, quantization
from mllm.config import LLMConfig, LoraConfig
from mllm.cpu_quant import GROUP_SIZE, Int4Linear, Int4Part, Int4Siblings, quantize_int4
from mllm.errors import CheckpointError
from mllm.generation import GenerationConfig, image_features, reply
from mllm.loading import load_model

LORA = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))


def _on_grid(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Weights that 4-bit groups hold exactly: per group of 32, 16 evenly spaced levels (a GGUF Q4_1 layer)."""
    g = torch.Generator().manual_seed(seed)
    groups = (out_features, in_features // GROUP_SIZE)
    scale = (torch.rand(groups, generator=g) * 0.02 + 0.005).bfloat16().float()
    low = (torch.randn(groups, generator=g) * 0.05 - 8 * scale).bfloat16().float() + 8 * scale
    codes = torch.randint(0, 16, (*groups, GROUP_SIZE), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15  # each group spans its whole range, as a min/max quantizer sees it
    return (low[..., None] + codes * scale[..., None]).reshape(out_features, in_features)


def _linear(weight: torch.Tensor, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    layer.weight.data.copy_(weight)
    return layer


def test_weights_on_a_4bit_grid_come_back_exactly():
    weight = _on_grid(48, 96)
    layer = Int4Linear(_linear(weight))
    eye = torch.eye(96)  # x = I gives W^T: the weights the kernel really multiplies by
    torch.testing.assert_close(layer(eye).float().t(), weight, atol=2e-3, rtol=1e-2)


def test_random_weights_stay_within_the_4bit_rounding_error():
    torch.manual_seed(0)
    linear = nn.Linear(128, 64, bias=True)
    layer = Int4Linear(linear)
    x = torch.randn(5, 7, 128)  # (..., in) -> (..., out): any leading shape
    got = layer(x)
    assert got.shape == (5, 7, 64) and got.dtype == torch.bfloat16
    step = (linear.weight.amax() - linear.weight.amin()) / 15
    bound = step / 2 * x.abs().sum(-1, keepdim=True)  # every weight off by at most half a step
    err = (got.float() - linear(x)).abs()
    assert (err <= bound + 0.05).all()
    assert err.mean() < 0.1 * linear(x).abs().mean()


def test_the_lora_side_path_adds_exactly_the_adapter():
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    a, b, scaling = torch.randn(4, 64), torch.randn(32, 4), 2.0
    plain, adapted = Int4Linear(base), Int4Linear(base, lora=(a, b, scaling))
    x = torch.randn(3, 64)
    delta = adapted(x).float() - plain(x).float()
    torch.testing.assert_close(delta, scaling * x @ a.t() @ b.t(), atol=0.05, rtol=0.02)  # up to bf16 rounding


def test_merging_then_quantizing_loses_the_adapter_the_side_path_keeps_it():
    # The default model's LLM comes from a Q4_1 GGUF: its weights sit on a 4-bit grid. A LoRA update is smaller
    # than that grid's step, so rounding the merged weights puts them back on the base's codes.
    torch.manual_seed(0)
    base = _linear(_on_grid(64, 64))
    a, b = torch.randn(4, 64) * 0.02, torch.randn(64, 4) * 0.02
    merged = _linear(base.weight + b @ a)
    x = torch.randn(16, 64)
    update = x @ (b @ a).t()  # what the adapter adds: (16, 64)
    lost = Int4Linear(merged)(x).float() - Int4Linear(base)(x).float()
    kept = Int4Linear(base, lora=(a, b, 1.0))(x).float() - Int4Linear(base)(x).float()
    assert (lost - update).norm() > 0.7 * update.norm()  # most of the update is gone
    assert (kept - update).norm() < 0.3 * update.norm()  # what is left is the bfloat16 rounding of the sum


def test_shapes_the_kernel_cannot_pack():
    with pytest.raises(CheckpointError, match="divisible by 32"):
        Int4Linear(nn.Linear(40, 16))
    with pytest.raises(CheckpointError, match="out_features by 16"):
        Int4Linear(nn.Linear(64, 10))
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))  # 10 outputs: kept, in bfloat16
    quantize_int4(model)
    assert isinstance(model[0], Int4Linear) and type(model[2]) is nn.Linear
    assert model[2].weight.dtype == torch.bfloat16
    assert model(torch.randn(2, 64)).shape == (2, 10)


def _ask(text):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


#: How far below the full-precision model's best logit (as a fraction of that position's logit range) int4's
#: first greedy token may be. int4 moves the tiny model's logits by up to 6% of their range, so a near-tie may
#: go either way on another CPU's rounding. Measured on the tiny LoRA checkpoint: int4 picks float32's token
#: (its own runner-up 1.4% of the range behind), and float32's runner-up is 2.7% below its best.
INT4_TIE = 0.03


def _greedy_ids(model, images, gen: GenerationConfig) -> list[int]:
    """The greedy reply's token ids to "what color" about the first image."""
    answer = reply(model, model.processor.encode(_ask("what color"), images[:1], add_generation_prompt=True), gen)
    "".join(answer)
    return list(answer.ids)


@pytest.fixture
def lora_checkpoint(tiny_config, tmp_path):
    """A tiny mllm checkpoint with a LoRA adapter whose update is large enough to change the answers."""
    config = tiny_config.replace(
        llm=LLMConfig(path=tiny_config.llm.path, lora=LORA),
        tune={"vision": "frozen", "connector": "full", "llm": "lora"},
    )
    torch.manual_seed(0)
    model = build_model(config, device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_pretrained(model.eval(), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_an_int4_model_keeps_its_adapter_and_leaves_tower_and_connector_alone(lora_checkpoint, images):
    full = load_model(str(lora_checkpoint), device="cpu", quantization="none")
    fast = load_model(str(lora_checkpoint), device="cpu", quantization="int4")
    layers = fast.llm.model.layers
    attention, mlp = layers[0].self_attn, layers[0].mlp
    assert all(isinstance(getattr(attention, n), Int4Part) for n in ("q_proj", "k_proj", "v_proj"))
    assert all(isinstance(getattr(mlp, n), Int4Part) for n in ("gate_proj", "up_proj"))
    assert isinstance(attention.o_proj, Int4Linear) and isinstance(mlp.down_proj, Int4Linear)
    assert isinstance(fast.llm.lm_head, Int4Linear) and isinstance(layers[0].input_layernorm, torch.nn.RMSNorm)
    assert attention.fused_q_k_v.ranks == [(0, 4), None, (4, 8)]  # the adapter is on q and v only
    assert all(p.dtype == torch.float32 for p in [*fast.vision.parameters(), *fast.connector.parameters()])
    batch = full.processor.collate([full.processor.encode(_ask("what color"), images[:1], add_generation_prompt=True)])
    with torch.no_grad():
        want = full(batch["input_ids"], pixel_values=batch["pixel_values"])[0][0, -1].float()
        got = fast(batch["input_ids"], pixel_values=batch["pixel_values"])[0][0, -1].float()
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.98
    # Greedy decoding with the KV cache agrees with itself and starts with the full model's first token (or, on a
    # near-tie, one whose full-precision logit is within INT4_TIE of the best: int4 rounding decides those).
    gen = GenerationConfig(max_new_tokens=8)
    ids = _greedy_ids(fast, images, gen)
    assert 1 <= len(ids) <= gen.max_new_tokens and _greedy_ids(fast, images, gen) == ids
    full_first = _greedy_ids(full, images, GenerationConfig(max_new_tokens=1))[0]
    assert full_first == int(want.argmax())  # the decode loop's first token is the prompt's best logit
    below_best = ((want.max() - want[ids[0]]) / (want.max() - want.min())).item()
    assert ids[0] == full_first or below_best <= INT4_TIE, (ids[0], full_first, below_best)


def test_int4_is_refused_for_training(tiny_config):
    config = tiny_config.replace(llm=LLMConfig(path=tiny_config.llm.path, quantization="int4"))
    with pytest.raises(CheckpointError, match="inference format.*qlora"):
        build_model(config, device="cpu", trainable=True)


def test_the_quantization_flag():
    p = Parser(prog="mllm chat")
    add_model_args(p)
    assert quantization(p.parse_args(["--quantization", "int4"])) == "int4"
    assert quantization(p.parse_args(["--load-4bit"])) == "4bit"
    assert quantization(p.parse_args([])) is None
    with pytest.raises(UsageError, match="not allowed with argument --quantization"):
        p.parse_args(["--quantization", "int4", "--load-8bit"])


def test_siblings_fused_give_what_each_would_alone():
    torch.manual_seed(0)
    q, k, v = nn.Linear(64, 64), nn.Linear(64, 32, bias=False), nn.Linear(64, 32)
    lora_q = (torch.randn(4, 64), torch.randn(64, 4) * 0.1, 2.0)
    group = Int4Siblings([(q, lora_q), (k, None), (v, None)], torch.bfloat16)
    parts = [Int4Part(group, i) for i in range(3)]
    alone = [Int4Linear(q, lora=lora_q), Int4Linear(k), Int4Linear(v)]
    x = torch.randn(2, 5, 64).bfloat16()
    for part, single in zip(parts, alone):
        torch.testing.assert_close(part(x).float(), single(x).float(), atol=0.02, rtol=0.02)
    # The same tensor changed in place, a sibling called twice, or another tensor: computed again, never stale.
    before = parts[1](x).float().clone()
    x.mul_(2)
    torch.testing.assert_close(parts[2](x).float(), alone[2](x).float(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(parts[1](x).float(), 2 * before, atol=0.05, rtol=0.02)
    with torch.inference_mode():  # no version counter: each sibling still takes its slice only once
        y = torch.randn(3, 64).bfloat16()
        first = parts[0](y).float()
        y.mul_(0)
        torch.testing.assert_close(parts[0](y).float(), alone[0](y).float(), atol=0.02, rtol=0.02)
        assert not torch.equal(first, parts[0](y).float())
    other = torch.randn(2, 5, 64).bfloat16()
    torch.testing.assert_close(parts[2](other).float(), alone[2](other).float(), atol=0.02, rtol=0.02)


def test_the_int4_forward_is_transformers_forward_without_the_overhead(lora_checkpoint, images):
    from transformers import DynamicCache

    from mllm.int4_decode import int4_decoder

    model = load_model(str(lora_checkpoint), device="cpu", quantization="int4")
    decoder = int4_decoder(model.llm)
    assert decoder is not None
    assert (
        int4_decoder(load_model(str(lora_checkpoint), device="cpu", quantization="none").llm) is None
    )  # float32: transformers decodes
    encoded = model.processor.encode(_ask("what color"), images[:1], add_generation_prompt=True)
    with torch.inference_mode():
        embeds = model.embed(encoded.input_ids[None], image_features=image_features(model, encoded))
        theirs = DynamicCache()
        want = model.llm(inputs_embeds=embeds, cache=theirs, use_cache=True).logits[:, -1]
        ours = DynamicCache()  # the prompt in two chunks: the second sees the first through the cache
        decoder.forward(embeds[0, :5], ours)
        got = decoder.forward(embeds[0, 5:], ours)
        torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02)
        torch.testing.assert_close(ours.layers[0].values, theirs.layers[0].values, atol=0.02, rtol=0.02)
        token_ours = token_theirs = 7
        for _ in range(12):
            got = decoder(token_ours, ours)  # (1, V)
            want = model.llm(input_ids=torch.tensor([[token_theirs]]), cache=theirs, use_cache=True).logits[:, -1]
            torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02)
            token_ours, token_theirs = int(got.argmax()), int(want.argmax())
            assert token_ours == token_theirs
        assert ours.get_seq_length() == theirs.get_seq_length() == embeds.shape[1] + 12
        torch.testing.assert_close(ours.layers[1].keys, theirs.layers[1].keys, atol=0.02, rtol=0.02)


@pytest.mark.parametrize("bf16_hardware", [True, False], ids=["bf16-in-hardware", "bf16-emulated"])
def test_wide_prompt_chunks_use_a_dense_copy_of_the_int4_weights_and_decode_steps_do_not(
    lora_checkpoint, images, bf16_hardware, monkeypatch
):
    """Both branches of the CPU's bf16 capability: the copy is bf16 where the CPU has it, float32 elsewhere
    (emulated bf16 products are slower than float32 ones); either way the same weights and answers."""
    from transformers import DynamicCache

    import mllm.int4_decode
    from mllm.int4_decode import DENSE_ROWS, Int4Decoder, int4_mm

    monkeypatch.setattr(mllm.int4_decode, "bf16_in_hardware", lambda: bf16_hardware)
    model = load_model(str(lora_checkpoint), device="cpu", quantization="int4")
    dense, plain = Int4Decoder(model.llm), Int4Decoder(model.llm, dense_budget_mib=0)
    assert dense.dense_bytes > 0 and plain.dense_bytes == 0 and plain.blocks[0].qkv.dense is None
    projection = dense.blocks[0].gate_up
    assert projection.dense.dtype == (torch.bfloat16 if bf16_hardware else torch.float32)
    assert dense.dense_bytes == sum(
        p.dense.numel() * p.dense.element_size() for b in dense.blocks for p in b.projections()
    )
    x = torch.randn(DENSE_ROWS, projection.in_features).bfloat16()
    want = int4_mm(x, projection.packed, projection.group_size, projection.scale_and_zero).float()
    # The same weights (dequantized by the kernel itself), only the product's rounding differs.
    torch.testing.assert_close(projection(x, wide=True).float(), want, atol=0.02, rtol=0.02)
    assert torch.equal(projection(x).float(), want)  # not wide (a decode step): the int4 kernel exactly
    assert torch.equal(projection(x[: DENSE_ROWS - 1], wide=True).float(), want[: DENSE_ROWS - 1])  # too few rows
    encoded = model.processor.encode(_ask("what color"), images[:1], add_generation_prompt=True)
    with torch.inference_mode():
        embeds = model.embed(encoded.input_ids[None], image_features=image_features(model, encoded))[0]
        assert embeds.shape[0] >= DENSE_ROWS
        caches = DynamicCache(), DynamicCache()
        got, want = (decoder.forward(embeds, cache) for decoder, cache in zip((dense, plain), caches))
        torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02)
        assert want[0, got.argmax()] >= want.max() - 0.05  # the same choice, or one within rounding of it
        torch.testing.assert_close(caches[0].layers[1].keys, caches[1].layers[1].keys, atol=0.02, rtol=0.02)


def test_the_cpu_is_read_not_assumed():
    from mllm.cpu_features import bf16_in_hardware, cpu_info, describe

    assert bf16_in_hardware(frozenset({"avx2", "avx512f", "avx512_bf16"}))  # Zen 4, Cooper Lake
    assert bf16_in_hardware(frozenset({"avx2", "amx_tile", "amx_bf16"}))  # Sapphire Rapids
    assert bf16_in_hardware(frozenset({"fp", "asimd", "bf16"}))  # Arm with the BF16 extension (Graviton 3)
    assert not bf16_in_hardware(frozenset({"avx2", "fma"}))  # Zen 2 / 3, most laptops
    assert not bf16_in_hardware(frozenset())  # an OS that does not say: float32, which is never emulated
    name, flags = cpu_info()
    assert name and describe().startswith(f"CPU: {name}; avx2 ")
    assert bf16_in_hardware() == bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
