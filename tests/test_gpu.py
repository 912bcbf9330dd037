"""The CUDA paths, on the tiny random model: bitsandbytes 4-bit loading and decoding, the batched decode step,
a QLoRA training run and bf16 autocast. Marked `gpu`; they skip only where CUDA is missing, and pytest prints
the reason (`-ra`)."""

from __future__ import annotations

import threading

import pytest
import torch

from mllm.assembly import build_model
from mllm.config import LLMConfig
from mllm.generation import GenerationConfig, Reply, image_features

DEVICE = "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason=f"no CUDA device (torch {torch.__version__}, built for CUDA: {torch.version.cuda or 'no'})",
    ),
]
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color"}]}]
PROMPTS = ["what color is the circle", "how many objects are there", "describe the image in one sentence", "hi"]
#: nf4's first greedy token against the unquantized model's, as a fraction of that model's logit range below
#: its best (the same rule as on CPU: test_quantization.py); bitsandbytes 4-bit promises closeness, not equality.
NF4_FIRST_TOKEN_TOLERANCE = 0.05


def _model(tiny_config, quantization: str = "none", dtype: str = "auto"):
    config = tiny_config.replace(llm=LLMConfig(path=tiny_config.llm.path, quantization=quantization, dtype=dtype))
    torch.manual_seed(0)  # the same connector weights whatever the LLM's format
    return build_model(config, device=DEVICE).eval()


def _encoded(model, text, image):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return model.processor.encode(messages, [image], add_generation_prompt=True)


def _reply_ids(model, encoded, gen, batcher=None) -> list[int]:
    answer = Reply(model, encoded.input_ids, gen, features=image_features(model, encoded), batcher=batcher)
    "".join(answer)
    return list(answer.ids)


def test_bitsandbytes_4bit_loads_on_cuda_and_decodes_greedily(tiny_config, images):
    full = _model(tiny_config, dtype="float32")
    model = _model(tiny_config, "4bit")
    q_proj = model.llm.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit" and q_proj.weight.device.type == DEVICE
    assert all(p.device.type == DEVICE for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.connector.parameters())  # never quantized
    encoded = _encoded(model, "what color", images[0])
    gen = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    ids = _reply_ids(model, encoded, gen)
    assert len(ids) == 8 and _reply_ids(model, encoded, gen) == ids  # greedy: the same again
    with torch.no_grad():
        pixels = model.processor.pixel_values(encoded.images).to(DEVICE)
        best = full(encoded.input_ids[None].to(DEVICE), pixel_values=pixels)[0][0, -1].float()
    below_best = ((best.max() - best[ids[0]]) / (best.max() - best.min())).item()
    assert ids[0] == int(best.argmax()) or below_best <= NF4_FIRST_TOKEN_TOLERANCE, (ids[0], below_best)


@pytest.mark.parametrize("quantization, dtype", [("none", "float32"), ("4bit", "auto")])
@torch.inference_mode()
def test_the_batched_cuda_step_gives_each_row_its_own_logits(tiny_config, quantization, dtype):
    """One transformers forward for three sequences per step, the middle one leaving half way, teacher-forced:
    each row's logits are its own, to the README's figures (1e-4 in float32, 1% of their scale in 4-bit)."""
    from transformers import DynamicCache

    from mllm.batch_decode import transformers_batch

    llm = _model(tiny_config, quantization, dtype).llm
    batch = transformers_batch(llm)
    assert batch is not None
    torch.manual_seed(5)
    vocab = llm.config.vocab_size
    prompts = [torch.randint(0, vocab, (1, n), device=DEVICE) for n in (3, 17, 9)]
    batched, alone = [DynamicCache() for _ in prompts], [DynamicCache() for _ in prompts]
    for prompt, one, other in zip(prompts, batched, alone):
        llm(input_ids=prompt, cache=one, use_cache=True)
        llm(input_ids=prompt, cache=other, use_cache=True)
    worst_abs = worst_relative = 0.0
    for step in range(12):
        rows = [0, 1, 2] if step < 6 else [2, 0]
        tokens = [(13 * step + 7 * r) % vocab for r in rows]
        together = batch.step(tokens, [batched[r] for r in rows]).float()  # (B, V)
        for k, (r, token) in enumerate(zip(rows, tokens)):
            ids = torch.tensor([[token]], device=DEVICE)
            own = llm(input_ids=ids, cache=alone[r], use_cache=True).logits[0, -1].float()
            worst_abs = max(worst_abs, (together[k] - own).abs().max().item())
            worst_relative = max(worst_relative, ((together[k] - own).abs().max() / own.abs().max()).item())
    for cache in batched:
        batch.release(cache)
    assert batch.rows == []
    if quantization == "none":
        assert worst_abs <= 1e-4, f"float32 rows {worst_abs:.2g} away from their own"
    else:
        assert worst_relative < 0.01, f"4-bit rows {worst_relative:.2%} of their scale away from their own"


def test_replies_decoded_together_on_cuda_are_the_replies_decoded_alone(tiny_config, images):
    from mllm.batching import Batcher

    model = _model(tiny_config, dtype="float32")
    gen = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    encoded = [_encoded(model, p, images[k % 2]) for k, p in enumerate(PROMPTS)]
    alone = [_reply_ids(model, e, gen) for e in encoded]
    batcher = Batcher(model, threading.Lock())
    together: list = [None] * len(encoded)
    start = threading.Barrier(len(encoded))

    def run(k):
        start.wait()
        together[k] = _reply_ids(model, encoded[k], gen, batcher)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(encoded))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    batcher.close()
    assert together == alone
    assert batcher.batched_tokens > batcher.steps  # more than one reply per forward on average


@pytest.fixture
def shapes(tmp_path):
    from training.synth import write_dataset

    return write_dataset(tmp_path / "shapes", 16, seed=0, splits=(("train", 0.75), ("val", 0.25)))


def _train(tiny_config, shapes, tmp_path, stage_name: str, on_model=None, **settings):
    """A short run of `stage_name` on the shapes world on CUDA; `on_model(model)` sees the model before it."""
    from training.formats import read_rows
    from training.loop import train
    from training.stage_config import load_stage
    from training.stage_model import model_for_stage

    base = {"per_device_batch_size": 4, "global_batch_size": 4, "epochs": 20, "warmup_ratio": 0.0}
    stage = load_stage(stage_name, {**base, "max_length": 256, "lora_r": 8, "lora_alpha": 16, **settings})
    model = model_for_stage(stage, config=tiny_config, device=DEVICE)
    if on_model is not None:
        on_model(model)
    rows = read_rows(shapes["train"], shapes["images"])
    result = train(model, stage, rows, tmp_path / "out", feature_cache=None, show_progress=False)
    return result, model


def test_a_qlora_run_on_cuda_trains_the_adapter_over_a_frozen_4bit_base(tiny_config, shapes, tmp_path):
    result, model = _train(tiny_config, shapes, tmp_path, "instruct_qlora", max_steps=6, llm_lr=1e-2)
    layer = model.llm.get_base_model().model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ == "Linear4bit" and layer.base_layer.weight.device.type == DEVICE
    assert not layer.base_layer.weight.requires_grad  # the 4-bit base is frozen
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert sum(result.losses[-2:]) / 2 < result.losses[0], result.losses
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_training_on_cuda_autocasts_to_bf16_with_fp32_trainable_weights(tiny_config, shapes, tmp_path):
    from training.loop import make_accelerator
    from training.precision import use_bf16
    from training.stage_config import load_stage

    assert use_bf16("auto", cpu=False) == torch.cuda.is_bf16_supported()
    if not torch.cuda.is_bf16_supported():  # a pre-Ampere GPU: auto trains in fp32, and bf16 is refused
        assert make_accelerator(load_stage("instruct")).mixed_precision == "no"
        with pytest.raises(ValueError, match="GPU without bf16"):
            use_bf16("bf16", cpu=False)
        return
    assert make_accelerator(load_stage("instruct")).mixed_precision == "bf16"
    products: set[torch.dtype] = set()  # what the connector's first product gives during the run

    def watch(model):
        # The connector's weights are fp32 (the LLM's are bf16 on CUDA already): only autocast makes its product
        # bf16, so this sees whether the run autocasts.
        first = next(m for m in model.connector.modules() if isinstance(m, torch.nn.Linear))
        assert first.weight.dtype == torch.float32
        first.register_forward_hook(lambda module, args, out: products.add(out.dtype))

    settings = {"llm": "lora", "llm_lr": 1e-2, "max_steps": 12, "precision": "auto"}
    result, model = _train(tiny_config, shapes, tmp_path, "instruct", on_model=watch, **settings)
    assert products == {torch.bfloat16}  # autocast ran the run's products in bf16
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # Adam's updates are not rounded
    assert sum(result.losses[-2:]) / 2 < result.losses[0], result.losses  # the random tiny LLM learns, slowly
