"""InstructBLIP in the main pipeline: a tiny random transformers checkpoint loaded with `load_model`, compared with
`InstructBlipForConditionalGeneration`; converted and reloaded; chatted with (KV reuse, rollback, `mllm chat`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_interop import ATOL, PROMPT, _blip_dir, _hf_greedy
from transformers import AutoProcessor, DynamicCache, InstructBlipForConditionalGeneration

from mllm.assembly import build_model
from mllm.checkpoint import save_pretrained
from mllm.generation import GenerationConfig, generate, image_features, stream_ids
from mllm.loading import load_model
from mllm.processor import Processor
from mllm.session import ChatSession
from mllm.templates import NAMED_TEMPLATES

GREEDY = GenerationConfig(max_new_tokens=8, ignore_eos=True)  # n tokens whatever the random model writes


@pytest.fixture(scope="module")
def instructblip_dir(tmp_path_factory):
    return _blip_dir(tmp_path_factory.mktemp("instructblip-llama"), "instructblip", "llama")


@pytest.fixture(scope="module")
def model(instructblip_dir):
    return load_model(str(instructblip_dir), device="cpu", quantization="none")  # recognised by its config.json


@pytest.fixture(scope="module")
def hf(instructblip_dir):
    return InstructBlipForConditionalGeneration.from_pretrained(instructblip_dir).eval()


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Two square 'photos' with structure at every scale (resized to 32 px)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(2):
        base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((48, 48))
        noisy = np.asarray(base).astype(int) + rng.integers(-20, 20, (48, 48, 3))
        out.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return out


def _ask(image, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def _logits(model, messages) -> torch.Tensor:
    """(L, V) prompt logits through `collate` + `MLLM.forward` (pixels and instructions, as training feeds it)."""
    batch = model.processor.collate([model.processor.encode(messages, add_generation_prompt=True)])
    del batch["labels"]  # a prompt has nothing supervised
    with torch.no_grad():
        return model(**batch)[0][0]


def test_load_model_matches_transformers(model, hf, instructblip_dir, photos):
    assert model.config.connector.qformer_text_input and model.connector.reads_text
    inputs = AutoProcessor.from_pretrained(instructblip_dir)(images=photos[0], text=PROMPT, return_tensors="pt")

    enc = model.processor.encode(_ask(photos[0], PROMPT), add_generation_prompt=True)
    assert enc.input_ids.tolist() == inputs["input_ids"][0].tolist()
    assert enc.qformer_ids == [inputs["qformer_input_ids"][0].tolist()]  # the user turn's text, BERT-tokenized
    with torch.no_grad():
        expected = hf(**inputs).logits[0]
    assert (_logits(model, _ask(photos[0], PROMPT)) - expected).abs().max() < ATOL

    hf_tokens = _hf_greedy(hf, inputs, hf.config.text_config.eos_token_id)
    with torch.inference_mode():
        features = image_features(model, enc)
    cache = DynamicCache(config=model.llm.config)
    assert list(stream_ids(model, enc.input_ids, cache, [], GREEDY, features)) == hf_tokens
    assert generate(model, _ask(photos[0], PROMPT), gen=GREEDY) == model.processor.decode(hf_tokens)


def test_instructions_steer_features_and_batch_with_right_padding(model, photos):
    short, long = _ask(photos[0], "what color"), _ask(photos[1], "how many objects are there in the image")
    encoded = [model.processor.encode(m, add_generation_prompt=True) for m in (short, long)]
    with torch.inference_mode():
        alone = torch.cat([image_features(model, e) for e in encoded])  # (2, Q, D_llm)
        batch = model.processor.collate(encoded)
        assert batch["qformer_attention_mask"].sum(1).tolist() == [len(ids) for e in encoded for ids in e.qformer_ids]
        batched = model.get_image_features(
            batch["pixel_values"], batch["qformer_input_ids"], batch["qformer_attention_mask"]
        )
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)  # padding the short instruction: no effect
        other = image_features(model, model.processor.encode(_ask(photos[0], "how many"), add_generation_prompt=True))
    assert (other - alone[:1]).abs().max() > 1e-3  # another question, other image tokens


def test_processor_instruction_is_the_turn_holding_the_image(model):
    p = model.processor
    # chatml: BLIP's own prompt puts every image first, so it is not prefix-stable over several images.
    processor = Processor(
        p.tokenizer, p.image_processor, NAMED_TEMPLATES["chatml"], p.image_token, p.tokens_per_image, max_images=3,
        qformer_tokenizer=p.qformer_tokenizer, qformer_max_length=p.qformer_max_length,
    )  # fmt: skip
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "left "}, {"type": "image"}, {"type": "text", "text": "what"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "<image>\nhow many<image>"},
    ]  # fmt: skip
    enc = processor.encode(messages, ["a.png", "b.png", "c.png"])
    expected = p.qformer_tokenizer(["left what", "how many", "how many"])["input_ids"]
    assert enc.qformer_ids == expected
    # A model without a Q-Former tokenizer gets no instruction ids at all.
    plain = Processor(
        p.tokenizer, p.image_processor, NAMED_TEMPLATES["chatml"], p.image_token, p.tokens_per_image, max_images=3
    )
    assert plain.encode(messages, ["a.png", "b.png", "c.png"]).qformer_ids is None


def test_convert_then_reload_then_chat_cli(model, instructblip_dir, photos, tmp_path, capsys):
    from app.cli import main

    out = tmp_path / "ckpt"
    assert main(["convert", "--from", "instructblip", str(instructblip_dir), str(out)]) == 0
    assert (out / "qformer_tokenizer").is_dir()
    assert json.loads((out / "mllm_config.json").read_text())["connector"]["qformer_text_input"] is True
    converted = load_model(str(out), device="cpu", quantization="none")
    expected = _logits(model, _ask(photos[0], PROMPT))
    assert (_logits(converted, _ask(photos[0], PROMPT)) - expected).abs().max() < ATOL

    # Saved after a direct load: a checkpoint that references the transformers directory, and reloads.
    save_pretrained(model, tmp_path / "ref")
    assert (tmp_path / "ref" / "qformer_tokenizer").is_dir() and not (tmp_path / "ref" / "llm").exists()
    assert (
        _logits(load_model(str(tmp_path / "ref"), device="cpu", quantization="none"), _ask(photos[0], PROMPT))
        - expected
    ).abs().max() < ATOL

    photos[0].save(tmp_path / "photo.png")
    capsys.readouterr()
    args = [
        "chat",
        "--model",
        str(out),
        "--device",
        "cpu",
        "--quantization",
        "none",
        "--image",
        str(tmp_path / "photo.png"),
    ]
    assert main([*args, "--max-new-tokens", "6", PROMPT]) == 0
    reply = generate(converted, _ask(photos[0], PROMPT), gen=GenerationConfig(max_new_tokens=6))
    assert capsys.readouterr().out == reply + "\n"


def test_chat_session_reuses_the_cache_and_matches_a_fresh_prefill(model, photos):
    session = ChatSession(model, gen=GREEDY)
    first = session.ask(PROMPT, [photos[0]])
    assert first == generate(model, _ask(photos[0], PROMPT), gen=GREEDY)
    second = session.ask("how many objects")
    full = len(model.processor.encode(session.messages[:-1], session.images, add_generation_prompt=True).input_ids)
    assert session.last_prefill_tokens < full - model.tokens_per_image  # the history was not prefilled again
    assert second == generate(model, session.messages[:-1], session.images, gen=GREEDY)

    # Edit the first turn: same image, another instruction, so other image tokens under the same token ids.
    session.rollback(0)
    edited = session.ask("describe the image in one sentence please", [photos[0]])
    prompt = model.processor.encode(session.messages[:-1], session.images, add_generation_prompt=True).input_ids
    assert session.last_prefill_tokens == len(prompt)  # the image comes first here: nothing cached is reusable
    assert edited == generate(model, session.messages[:-1], session.images, gen=GREEDY)


def test_bad_checkpoints_and_inputs_are_clear_errors(model, photos, tmp_path):
    pixel_values = model.processor.pixel_values([photos[0]])
    with pytest.raises(ValueError, match="reads each image's instruction too"):
        model.get_image_features(pixel_values)  # the instruction ids are not optional for this model

    save_pretrained(model, tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt" / "qformer_tokenizer")
    with pytest.raises(ValueError, match="qformer_tokenizer/ .* is missing"):
        load_model(str(tmp_path / "ckpt"), device="cpu", quantization="none")

    # Converted by an earlier mllm: qformer_tokenizer/ there, but the config can't say the Q-Former reads text.
    save_pretrained(model, tmp_path / "old")
    config = json.loads((tmp_path / "old" / "mllm_config.json").read_text())
    for key in ("qformer_text_input", "qformer_vocab_size", "qformer_max_text_positions"):
        del config["connector"][key]
    (tmp_path / "old" / "mllm_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="converted by an older mllm"):
        load_model(str(tmp_path / "old"), device="cpu", quantization="none")


def test_models_without_text_input_refuse_instructions(tiny_model, tiny_config, images):
    enc = tiny_model.processor.encode(_ask(images[0], "what color"), add_generation_prompt=True)
    assert enc.qformer_ids is None and "qformer_input_ids" not in tiny_model.processor.collate([enc])
    with pytest.raises(ValueError, match="reads no instruction text"):
        tiny_model.get_image_features(tiny_model.processor.pixel_values(enc.images), torch.ones(1, 3, dtype=torch.long))

    from mllm.config import ConnectorConfig

    text_config = tiny_config.replace(connector=ConnectorConfig(kind="qformer", qformer_text_input=True))
    with pytest.raises(ValueError, match="needs the Q-Former's tokenizer"):
        build_model(text_config, device="cpu")
