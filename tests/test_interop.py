"""Interop: tiny random LLaVA / BLIP-2 / InstructBLIP checkpoints built with transformers, imported into mllm
and compared with transformers on the same image and prompt; exports reloaded by transformers.
InstructBLIP's own tests (its Q-Former reads the instruction) are in test_interop_instructblip.py."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoProcessor,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    CLIPImageProcessor,
    DynamicCache,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from mllm.assembly import build_model
from mllm.checkpoint import save_pretrained
from mllm.generation import GenerationConfig, stream_ids
from mllm.tiny import CORPUS, build_tokenizer

# llava-hf/llava-1.5-7b-hf's processor template: list content, images first, "USER: ... ASSISTANT:".
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
VISION = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)
QFORMER = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, encoder_hidden_size=32
)
MEAN, STD = (0.4, 0.45, 0.5), (0.25, 0.3, 0.35)
PROMPT = "what color is the circle"
#: The README: imported llava-hf, BLIP-2 and InstructBLIP models "give the same logits as transformers (max abs
#: diff 0.0)", and an exported checkpoint gives "the same logits" in transformers; measured 0.0 in every test here.
#: As the bound of a `diff < ATOL` check (test_interop_instructblip.py), float32's smallest normal number: only an
#: exact match passes.
ATOL = torch.finfo(torch.float32).tiny
NO_STOP = 10**6  # an id no vocabulary reaches


def _llm_tokenizer(directory):
    """conftest's BPE tokenizer with `<image>` added and a BOS the tokenizer writes itself (as LLaMA / OPT do)."""
    tok = build_tokenizer(directory)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.bos_token_id)]
    )
    return tok


def _bert_tokenizer():
    """A tiny WordPiece tokenizer with [CLS] ... [SEP], like InstructBLIP's Q-Former (BERT) tokenizer."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(CORPUS * 4, trainers.WordPieceTrainer(vocab_size=150, special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def _perturb(model: torch.nn.Module) -> None:
    """Move every weight off its init (LayerNorms to non-trivial scales and shifts) so a mis-mapped tensor shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _text_config(kind: str, tok) -> dict:
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    common["pad_token_id"] = tok.pad_token_id
    if kind == "opt":
        return dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    word_embed_proj_dim=64, max_position_embeddings=512, **common)  # fmt: skip
    if kind == "t5":
        return dict(model_type="t5", d_model=64, d_ff=128, num_layers=1, num_heads=4, vocab_size=len(tok))
    return dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **common)  # fmt: skip


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llava-hf")
    tok = _llm_tokenizer(directory)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", **VISION),
        text_config=_text_config("llama", tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    _perturb(model)
    model.save_pretrained(directory)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_TEMPLATE,
        num_additional_image_tokens=1,
    ).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A square 'photo' (resized to 32 px by every processor) with structure at every scale."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((48, 48), Image.Resampling.BILINEAR)
    noise = rng.integers(-20, 20, (48, 48, 3))
    return Image.fromarray(np.clip(np.asarray(img).astype(int) + noise, 0, 255).astype(np.uint8))


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def _greedy(model, input_ids, features, n: int = 8) -> list[int]:
    gen = GenerationConfig(max_new_tokens=n, ignore_eos=True)
    return list(stream_ids(model, input_ids, DynamicCache(config=model.llm.config), [], gen, features))


def _hf_greedy(hf_model, inputs, eos_id: int, n: int = 8) -> list[int]:
    # No stop token on either side, so n tokens are compared whatever the random model writes.
    out = hf_model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=NO_STOP, pad_token_id=eos_id)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    return new


def _assert_same_logits(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit: the README's "max abs diff 0.0" (the same operations on the same weights, in the same order)."""
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff == 0.0, f"max abs diff {diff:.3g}; the README says 0.0"


def _mllm_logits(model, messages, images, **features_kwargs):
    enc = model.processor.encode(messages, images, add_generation_prompt=True)
    pixel_values = model.processor.pixel_values(enc.images)
    with torch.no_grad():
        logits, _ = model(enc.input_ids[None], pixel_values=pixel_values)
    return enc, pixel_values, logits[0]


# ---- LLaVA --------------------------------------------------------------------------------------------
def test_llava_import_is_exact(llava_dir, photo):
    from mllm.loading import load_model

    model = load_model(str(llava_dir), device="cpu", quantization="none")  # recognised by its config.json, not its name
    assert model.config.connector.kind == "mlp2x_gelu" and model.tokens_per_image == 16

    hf = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    processor = AutoProcessor.from_pretrained(llava_dir)
    prompt = processor.apply_chat_template(_user(PROMPT), add_generation_prompt=True)
    inputs = processor(images=photo, text=prompt, return_tensors="pt")

    enc, pixel_values, logits = _mllm_logits(model, _user(PROMPT), [photo])
    assert enc.input_ids.tolist() == inputs["input_ids"][0].tolist()  # same template, BOS and image expansion
    torch.testing.assert_close(pixel_values, inputs["pixel_values"], atol=1e-6, rtol=0)
    with torch.no_grad():
        expected = hf(**inputs).logits[0]
    _assert_same_logits(logits, expected)

    features = model.get_image_features(pixel_values)
    eos = hf.config.text_config.eos_token_id
    assert _greedy(model, enc.input_ids, features) == _hf_greedy(hf, inputs, eos)


def test_llava_convert_carries_weights_and_reloads_exactly(llava_dir, photo, tmp_path):
    from app.cli import main
    from mllm.loading import load_model

    assert main(["convert", "--from", "llava", str(llava_dir), str(tmp_path / "ckpt")]) == 0
    ckpt = tmp_path / "ckpt"
    config = json.loads((ckpt / "mllm_config.json").read_text())
    assert (config["vision"]["path"], config["llm"]["path"]) == ("./vision", "./llm")
    assert (ckpt / "vision" / "model.safetensors").is_file() and (ckpt / "llm" / "model.safetensors").is_file()

    direct = load_model(str(llava_dir), device="cpu", quantization="none")
    moved = tmp_path / "elsewhere"
    ckpt.rename(moved)  # relative paths: the checkpoint folder can move
    converted = load_model(str(moved), device="cpu", quantization="none")
    _, _, expected = _mllm_logits(direct, _user(PROMPT), [photo])
    _, _, got = _mllm_logits(converted, _user(PROMPT), [photo])
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_model_loaded_from_llava_dir_saves_a_reference(llava_dir, photo, tmp_path):
    """Saved after a direct load, a checkpoint references the llava-hf directory (no copies) and reloads."""
    from mllm.loading import load_model

    direct = load_model(str(llava_dir), device="cpu", quantization="none")
    save_pretrained(direct, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "llm").exists()
    _, _, expected = _mllm_logits(direct, _user(PROMPT), [photo])
    _, _, got = _mllm_logits(
        load_model(str(tmp_path / "ckpt"), device="cpu", quantization="none"), _user(PROMPT), [photo]
    )
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_convert_refuses_the_wrong_format(llava_dir, tmp_path, capsys):
    from app.cli import main

    assert main(["convert", "--from", "blip2", str(llava_dir), str(tmp_path / "out")]) == 2
    assert "is a llava checkpoint, not blip2" in capsys.readouterr().err
    assert main(["convert", "--from", "llava", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2


# ---- BLIP-2 / InstructBLIP ---------------------------------------------------------------------------
def _blip_dir(directory, kind: str, text: str):
    tok = _llm_tokenizer(directory)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD)
    vision = dict(**VISION, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    if kind == "blip2":
        config = Blip2Config(
            vision_config=vision,
            qformer_config=dict(**QFORMER, cross_attention_frequency=2),
            text_config=_text_config(text, tok),
            num_query_tokens=4,
            image_token_index=image_token_id,
        )
        model = Blip2ForConditionalGeneration(config)
        processor = Blip2Processor(image_processor=image_processor, tokenizer=tok, num_query_tokens=4)
    else:
        qformer_tok = _bert_tokenizer()
        config = InstructBlipConfig(
            vision_config=vision,
            qformer_config=dict(**QFORMER, cross_attention_frequency=1, vocab_size=len(qformer_tok)),
            text_config=_text_config(text, tok),
            num_query_tokens=4,
            image_token_index=image_token_id,
        )
        model = InstructBlipForConditionalGeneration(config)
        processor = InstructBlipProcessor(
            image_processor=image_processor, tokenizer=tok, qformer_tokenizer=qformer_tok, num_query_tokens=4
        )
    _perturb(model)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    return _blip_dir(tmp_path_factory.mktemp("blip2-opt"), "blip2", "opt")


def test_blip2_import_is_exact(blip2_dir, photo, tmp_path):
    from mllm.loading import load_model

    model = load_model(str(blip2_dir), device="cpu", quantization="none")
    assert model.config.connector.kind == "qformer" and model.tokens_per_image == 4

    hf = Blip2ForConditionalGeneration.from_pretrained(blip2_dir).eval()
    processor = AutoProcessor.from_pretrained(blip2_dir)
    prompt = "Question: " + PROMPT + "? Answer:"
    inputs = processor(images=photo, text=prompt, return_tensors="pt")

    enc, pixel_values, logits = _mllm_logits(model, _user(prompt), [photo])
    assert enc.input_ids.tolist() == inputs["input_ids"][0].tolist()  # query tokens, then BOS, then the prompt
    torch.testing.assert_close(pixel_values, inputs["pixel_values"], atol=1e-6, rtol=0)
    with torch.no_grad():
        expected = hf(**inputs).logits[0]
    _assert_same_logits(logits, expected)

    features = model.get_image_features(pixel_values)
    assert _greedy(model, enc.input_ids, features) == _hf_greedy(hf, inputs, hf.config.text_config.eos_token_id)

    # Converted: the same model from OUT/vision + OUT/llm + connector.safetensors.
    from mllm.interop import convert

    converted = load_model(
        str(convert(blip2_dir, tmp_path / "ckpt", source="blip2")), device="cpu", quantization="none"
    )
    _, _, got = _mllm_logits(converted, _user(prompt), [photo])
    _assert_same_logits(got, logits)


def test_flan_t5_blip2_is_refused(tmp_path):
    from mllm.loading import load_model

    tok = _llm_tokenizer(tmp_path)
    config = Blip2Config(
        vision_config=VISION, qformer_config=QFORMER, text_config=_text_config("t5", tok), num_query_tokens=4
    )
    Blip2ForConditionalGeneration(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="encoder-decoder LLM"):
        load_model(str(tmp_path))


# ---- export ------------------------------------------------------------------------------------------
def _trained_checkpoint(
    tiny_config, directory, resize_mode: str = "resize", lora: bool = False, connector: str = "mlp2x_gelu"
):
    """A tiny mllm checkpoint whose connector (and LoRA) are off their init, as after training."""
    from mllm.config import LLMConfig, LoraConfig

    llm = LLMConfig(path=tiny_config.llm.path)
    if lora:
        llm = LLMConfig(
            path=tiny_config.llm.path, lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
        )
    config = tiny_config.replace(
        # A pad colour with mean * 255 integral: mllm rounds it, LLaVA / transformers truncate (see export.py).
        vision=dataclasses.replace(tiny_config.vision, resize_mode=resize_mode, image_mean=(0.4, 0.4, 0.4)),
        connector=dataclasses.replace(tiny_config.connector, kind=connector),
        llm=llm,
        tune={"vision": "frozen", "connector": "full", "llm": "lora" if lora else "frozen"},
    )
    torch.manual_seed(0)
    model = build_model(config, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    save_pretrained(model, directory)
    return directory


def _hf_inputs(processor, messages, image):
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=image, text=prompt, return_tensors="pt")


@pytest.mark.parametrize(
    "connector, resize_mode", [("mlp2x_gelu", "resize"), ("mlp2x_gelu", "pad"), ("linear", "resize")]
)
def test_export_hf_llava_reloads_in_transformers(tiny_config, photo, tmp_path, connector, resize_mode):
    from app.cli import main
    from mllm.loading import load_model

    ckpt = _trained_checkpoint(tiny_config, tmp_path / "ckpt", resize_mode, connector=connector)
    assert main(["export", str(ckpt), str(tmp_path / "hf"), "--format", "hf-llava"]) == 0
    model = load_model(str(ckpt), device="cpu", quantization="none")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()  # no custom code
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert hf.config.image_token_id == model.image_token_id < hf.config.text_config.vocab_size

    image = photo.crop((0, 0, 48, 40))  # not square: the exported image processor must resize / pad like mllm
    inputs = _hf_inputs(processor, _user(PROMPT), image)
    enc, pixel_values, logits = _mllm_logits(model, _user(PROMPT), [image])
    assert enc.input_ids.tolist() == inputs["input_ids"][0].tolist()
    torch.testing.assert_close(pixel_values, inputs["pixel_values"], atol=1e-6, rtol=0)
    with torch.no_grad():
        expected = hf(**inputs).logits[0]
    vocab = logits.shape[-1]
    _assert_same_logits(expected[:, :vocab], logits)
    # The rows added for the image token never win: their logit is the mean of the others.
    assert (expected.argmax(-1) == logits.argmax(-1)).all()

    features = model.get_image_features(pixel_values)
    assert _greedy(model, enc.input_ids, features) == _hf_greedy(hf, inputs, processor.tokenizer.eos_token_id)


def test_export_merges_lora_only_when_asked(tiny_config, photo, tmp_path, capsys):
    from safetensors.torch import load_file

    from app.cli import main
    from mllm.interop import export_hf_llava
    from mllm.loading import load_model

    ckpt = _trained_checkpoint(tiny_config, tmp_path / "ckpt", lora=True)
    assert main(["export", str(ckpt), str(tmp_path / "hf"), "--format", "hf-llava"]) == 2
    assert "--merge-lora" in capsys.readouterr().err
    export_hf_llava(ckpt, tmp_path / "hf", merge_lora=True)

    adapter = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    base = load_file(tiny_config.llm.path + "/model.safetensors")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    key = "layers.0.self_attn.q_proj"
    a = next(v for k, v in adapter.items() if f"{key}.lora_A" in k)
    b = next(v for k, v in adapter.items() if f"{key}.lora_B" in k)
    merged = next(v for k, v in exported.items() if k.endswith(f"{key}.weight") and "language_model" in k)
    assert b.abs().max() > 0
    torch.testing.assert_close(merged, base[f"model.{key}.weight"] + (8 / 4) * b @ a, atol=1e-6, rtol=0)

    model = load_model(str(ckpt), device="cpu", quantization="none")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    inputs = _hf_inputs(AutoProcessor.from_pretrained(tmp_path / "hf"), _user(PROMPT), photo)
    _, _, logits = _mllm_logits(model, _user(PROMPT), [photo])
    with torch.no_grad():
        expected = hf(**inputs).logits[0, :, : logits.shape[-1]]
    _assert_same_logits(expected, logits)


def test_export_refuses_what_llava_cannot_hold(tiny_config, tmp_path):
    from mllm.config import ConnectorConfig, MLLMConfig, VisionConfig
    from mllm.interop import export_hf_llava

    for name, config, reason in [
        ("qformer", tiny_config.replace(connector=ConnectorConfig(kind="qformer")), "'qformer' connector"),
        ("cnn", MLLMConfig(vision=VisionConfig(kind="efficientnet_lite0")), "'efficientnet_lite0' is not"),
    ]:
        (tmp_path / name).mkdir()
        config.save(tmp_path / name / "mllm_config.json")
        with pytest.raises(ValueError, match=reason):
            export_hf_llava(tmp_path / name, tmp_path / f"{name}-hf")


def test_llava_and_blip2_load_by_hub_id_from_the_offline_cache(offline_hub, llava_dir, blip2_dir, photo):
    from mllm.loading import load_model

    offline_hub.publish("llava-hf/tiny-llava", llava_dir)
    offline_hub.publish("Salesforce/tiny-blip2", blip2_dir, commit="b" * 40)
    for repo, directory in (("llava-hf/tiny-llava", llava_dir), ("Salesforce/tiny-blip2@" + "b" * 40, blip2_dir)):
        by_name = load_model(repo, device="cpu", quantization="none")  # recognised by its config, not its name
        by_path = load_model(str(directory), device="cpu", quantization="none")
        torch.testing.assert_close(
            _mllm_logits(by_name, _user(PROMPT), [photo])[2], _mllm_logits(by_path, _user(PROMPT), [photo])[2]
        )
