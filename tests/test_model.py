"""Behaviour of the MLLM on tiny random checkpoints: merge checks, KV cache, sessions, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

from mllm.assembly import build_model
from mllm.checkpoint import load_pretrained, save_pretrained
from mllm.config import LoraConfig, MLLMConfig
from mllm.generation import GenerationConfig, TextStream, generate, image_features, stream_ids
from mllm.image_processing import ImageError
from mllm.processor import IGNORE_INDEX
from mllm.session import ChatSession


def _ask(text: str, n_images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def test_image_count_mismatch_raises_in_processor(tiny_model, images):
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        tiny_model.processor.encode(_ask("what color", n_images=2), images[:1])
    with pytest.raises(ValueError, match="0 <image> placeholder"):
        tiny_model.processor.encode([{"role": "user", "content": "no image here"}], images[:1])


def test_image_count_mismatch_raises_in_model(tiny_model, images):
    enc = tiny_model.processor.encode(_ask("what color", n_images=2), images)
    one_image = tiny_model.processor.pixel_values(images[:1])
    with pytest.raises(ValueError, match="image token slots"):
        tiny_model(enc.input_ids[None], pixel_values=one_image)


def test_placeholders_expand_to_tokens_per_image(tiny_model, images):
    enc = tiny_model.processor.encode(_ask("describe", n_images=2), images, add_generation_prompt=True)
    n_slots = int((enc.input_ids == tiny_model.image_token_id).sum())
    assert n_slots == 2 * tiny_model.tokens_per_image == 2 * 16  # 32 px / 8 px patches, CLS dropped


def test_labels_cover_assistant_spans_only(tiny_model, images):
    conversation = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "how many objects"},
        {"role": "assistant", "content": "three objects"},
    ]
    enc = tiny_model.processor.encode(conversation, images[:1])
    supervised = enc.labels[enc.labels != IGNORE_INDEX].tolist()
    text = tiny_model.processor.tokenizer.decode(supervised)
    assert text == "red<|im_end|>\nthree objects<|im_end|>\n"
    assert (enc.labels[enc.input_ids == tiny_model.image_token_id] == IGNORE_INDEX).all()


def test_forward_returns_logits_and_loss(tiny_model, images):
    conversation = _ask("what color") + [{"role": "assistant", "content": "red"}]
    batch = tiny_model.processor.collate([tiny_model.processor.encode(conversation, images[:1])] * 2)
    logits, loss = tiny_model(**batch)
    assert logits.shape[:2] == batch["input_ids"].shape
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert tiny_model.connector.proj[0].weight.grad is not None


def test_all_masked_labels_raise(tiny_model, images):
    enc = tiny_model.processor.encode(_ask("what color"), images[:1])
    with pytest.raises(ValueError, match="every label"):
        tiny_model(**tiny_model.processor.collate([enc]))


def _greedy_without_cache(model, ids: torch.Tensor, features, n: int) -> list[int]:
    out = []
    ids = ids[None]
    with torch.no_grad():
        for _ in range(n):
            embeds = model.embed(ids, image_features=features)
            logits = model.llm(inputs_embeds=embeds, use_cache=False).logits
            token = int(logits[0, -1].argmax())
            if token in model.processor.stop_token_ids:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_greedy_tokens_equal_with_and_without_kv_cache(tiny_model, images):
    enc = tiny_model.processor.encode(_ask("what color"), images[:1], add_generation_prompt=True)
    with torch.no_grad():
        features = tiny_model.get_image_features(tiny_model.processor.pixel_values(enc.images))
    gen = GenerationConfig(max_new_tokens=12)
    cached = list(stream_ids(tiny_model, enc.input_ids, DynamicCache(), [], gen, features))
    assert cached == _greedy_without_cache(tiny_model, enc.input_ids, features, 12)
    assert len(cached) > 0


def test_session_follow_up_equals_full_reprefill(tiny_model, images):
    gen = GenerationConfig(max_new_tokens=8)
    session = ChatSession(tiny_model, gen=gen)
    first = session.ask("what color is the circle", images[:1])
    second = session.ask("and the square", images[1:])
    full_prompt_tokens = len(
        tiny_model.processor.encode(session.messages[:-1], session.images, add_generation_prompt=True).input_ids
    )
    # The follow-up prefilled only its new tokens, not the history.
    assert session.last_prefill_tokens < full_prompt_tokens - tiny_model.tokens_per_image
    fresh = generate(tiny_model, session.messages[:-1], session.images, gen=gen)
    assert second == fresh
    assert session.messages[1] == {"role": "assistant", "content": first}


def test_session_bad_turn_leaves_no_trace(tiny_model, images):
    session = ChatSession(tiny_model, gen=GenerationConfig(max_new_tokens=3))
    session.ask("hello")
    before = list(session.messages)
    with pytest.raises(ImageError, match="cat.png: file not found"):
        session.ask("look", ["/nonexistent/cat.png"])
    assert session.messages == before and session.images == []


def test_session_over_long_conversation_raises_with_limit(tiny_model):
    tiny_model.processor.max_length = 64
    session = ChatSession(tiny_model, gen=GenerationConfig(max_new_tokens=3))
    with pytest.raises(ValueError, match="limit of 64.*reset"):
        session.ask("hello " * 100)


def test_sampling_is_reproducible_with_seed(tiny_model, images):
    gen = GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, repetition_penalty=1.2, seed=7)
    a = generate(tiny_model, _ask("hi"), images[:1], gen=gen)
    b = generate(tiny_model, _ask("hi"), images[:1], gen=gen)
    assert a == b


@pytest.mark.parametrize("tune_llm", ["lora", "full"])
def test_save_load_gives_identical_logits(tiny_config, images, tmp_path, tune_llm):
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    config: MLLMConfig = tiny_config.replace(
        llm=tiny_config.llm.__class__(path=tiny_config.llm.path, lora=lora if tune_llm == "lora" else None),
        tune={"vision": "full", "connector": "full", "llm": tune_llm},
    )
    torch.manual_seed(0)
    model = build_model(config, device="cpu")
    with torch.no_grad():  # make every trained part differ from its base so a missing file would show
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    model.eval()
    conversation = _ask("what color") + [{"role": "assistant", "content": "red"}]
    batch = model.processor.collate([model.processor.encode(conversation, images[:1])])
    with torch.no_grad():
        expected, _ = model(**batch)
    save_pretrained(model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / ("adapter" if tune_llm == "lora" else "llm")).is_dir()
    if tune_llm == "lora":  # the adapter names its base as the config does, not by a local cache path
        adapter_config = json.loads((tmp_path / "ckpt" / "adapter" / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == config.llm.path
    assert not list((tmp_path / "ckpt").rglob("*.bin")) and not list((tmp_path / "ckpt").rglob("*.pt"))
    loaded = load_pretrained(tmp_path / "ckpt", device="cpu")
    with torch.no_grad():
        got, _ = loaded(**batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="not an mllm checkpoint"):
        load_pretrained(tmp_path)


def test_supervised_logits_only_gives_the_same_loss(tiny_model, images):
    conversation = _ask("what color") + [{"role": "assistant", "content": "red"}]
    batch = tiny_model.processor.collate([tiny_model.processor.encode(conversation, images[:1])] * 2)
    with torch.no_grad():
        full_logits, full = tiny_model(**batch)
        rows, fast = tiny_model(**batch, supervised_logits_only=True)
    n_supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert rows.shape == (n_supervised, full_logits.shape[-1])
    torch.testing.assert_close(fast, full)


class _ByteTokenizer:
    """Ids are UTF-8 bytes: the smallest tokenizer whose tokens can split a character."""

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_a_split_character_and_flushes_the_rest():
    text = TextStream(_ByteTokenizer())
    e_acute = "é".encode()  # two bytes, two tokens
    assert text.push(ord("a")) == "a"
    assert text.push(e_acute[0]) == ""  # half a character: wait for the rest
    assert text.push(e_acute[1]) == "é"
    assert text.push("€".encode()[0]) == ""
    assert text.flush() == "\ufffd"  # the reply ended mid-character: shown as a one-shot decode shows it
    assert text.flush() == ""


def test_typed_errors_name_each_kind_of_bad_request(tiny_model, images):
    """Callers (the engine, the API, the CLI) tell errors apart by type and code, never by wording."""
    from mllm import ContextLengthError, MessageError, MLLMError, TooManyImagesError

    processor = tiny_model.processor
    with pytest.raises(MessageError) as wrong_count:
        processor.encode(_ask("what color", n_images=2), images[:1])
    with pytest.raises(MessageError):
        processor.encode([{"role": "robot", "content": "hi"}])
    with pytest.raises(MessageError):
        processor.encode([{"role": "user", "content": [{"type": "input_audio"}]}])
    with pytest.raises(TooManyImagesError) as too_many:
        processor.encode(_ask("many", n_images=processor.max_images + 1), images[:1] * (processor.max_images + 1))
    with pytest.raises(ContextLengthError) as too_long:
        processor.encode([{"role": "user", "content": "hello " * (processor.max_length + 1)}])
    with pytest.raises(ImageError) as bad_image:
        processor.pixel_values([b"not an image"])
    codes = [e.value.code for e in (wrong_count, too_many, too_long, bad_image)]
    assert codes == ["invalid_request", "too_many_images", "context_length_exceeded", "invalid_image"]
    assert all(isinstance(e.value, MLLMError) for e in (wrong_count, too_many, too_long, bad_image))


def test_processor_loads_on_its_own_and_encodes_like_the_models(tiny_model, images, tmp_path):
    """`Processor.from_pretrained` reads a checkpoint's processor without any weights; it encodes exactly as the
    loaded model's processor does."""
    from mllm import Processor

    save_pretrained(tiny_model, tmp_path / "ckpt")
    alone = Processor.from_pretrained(tmp_path / "ckpt")
    messages = _ask("what color") + [{"role": "assistant", "content": "red"}]
    ours, theirs = alone.encode(messages, images[:1]), tiny_model.processor.encode(messages, images[:1])
    assert torch.equal(ours.input_ids, theirs.input_ids) and torch.equal(ours.labels, theirs.labels)
    assert torch.equal(alone.pixel_values(images), tiny_model.processor.pixel_values(images))
    assert (alone.max_images, alone.tokens_per_image, alone.stop_token_ids) == (
        tiny_model.processor.max_images,
        tiny_model.processor.tokens_per_image,
        tiny_model.processor.stop_token_ids,
    )


def test_public_entry_points():
    import mllm

    assert {"load_model", "ChatSession", "generate", "Processor", "MLLMError"} <= set(mllm.__all__)
    assert all(hasattr(mllm, name) for name in mllm.__all__)


def test_chunked_prefill_gives_the_same_tokens(tiny_model, images):
    """A prompt prefilled a few tokens at a time decodes exactly as one prefilled at once."""
    enc = tiny_model.processor.encode(_ask("describe the image in one sentence please"), images[:1], True)
    features = image_features(tiny_model, enc)
    gen = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    whole = list(stream_ids(tiny_model, enc.input_ids, DynamicCache(), [], gen, features))
    pieces = list(stream_ids(tiny_model, enc.input_ids, DynamicCache(), [], gen, features, prefill_chunk=5))
    assert pieces.count(None) == (len(enc.input_ids) - 1) // 5  # control goes back between two chunks
    assert [t for t in pieces if t is not None] == whole


def test_built_in_models_load_by_name_and_a_missing_one_says_how_to_make_it(tiny_model, tmp_path, monkeypatch):
    import mllm.loading as loading
    from mllm.errors import CheckpointError

    save_pretrained(tiny_model, tmp_path / "shipped")
    monkeypatch.setitem(loading.BUILTIN, "default-qformer", tmp_path / "shipped")
    model = loading.load_model("default-qformer", device="cpu", quantization="none")
    assert model.config == tiny_model.config
    assert loading.load_processor("default-qformer").max_length == tiny_model.processor.max_length
    monkeypatch.setitem(loading.BUILTIN, "default-qformer", tmp_path / "absent")
    with pytest.raises(CheckpointError, match=r"'default-qformer' is not in this install.*train_demo.sh"):
        loading.load_model("default-qformer", device="cpu")
