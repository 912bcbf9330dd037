"""The llama.cpp backend on the tiny model: its GGUF written in the test (f32, LoRA as a GGUF adapter), the
same conversation giving the same tokens as the transformers forward of the same weights, a reply decoded in
a batch equal to the reply decoded alone, sessions, the prefix cache, cancellation and sampling seeds."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from app.engine import ChatEngine
from mllm.assembly import build_model
from mllm.checkpoint import save_pretrained
from mllm.config import LLMConfig, LoraConfig
from mllm.generation import GenerationConfig, generate
from mllm.loading import load_model
from mllm.session import ChatSession

LORA = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
GREEDY = GenerationConfig(max_new_tokens=10, ignore_eos=True)
QUESTIONS = ["what color is the circle", "how many objects are there", "describe the image", "hi", "where is it"]


@pytest.fixture(scope="module")
def checkpoint(tiny_config, tmp_path_factory):
    """A tiny mllm checkpoint whose LoRA adapter changes the answers (so a lost adapter would show)."""
    config = tiny_config.replace(
        llm=LLMConfig(path=tiny_config.llm.path, lora=LORA),
        tune={"vision": "frozen", "connector": "full", "llm": "lora"},
    )
    torch.manual_seed(0)
    model = build_model(config, device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    directory = tmp_path_factory.mktemp("llamacpp") / "ckpt"
    save_pretrained(model.eval(), directory)
    return directory


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    directory = tmp_path_factory.mktemp("mllm-cache")
    mp.setenv("MLLM_CACHE", str(directory))  # the GGUFs are written here, not in the user's cache
    yield directory
    mp.undo()


@pytest.fixture(scope="module")
def llamacpp(checkpoint, cache_dir):
    return load_model(str(checkpoint), device="cpu", backend="llamacpp", quantization="f32")


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The same weights through transformers' forward, in float32 (the adapter merged)."""
    return load_model(str(checkpoint), device="cpu", backend="transformers", quantization="none")


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def picture(k: int) -> Image.Image:
    return Image.new("RGB", (24, 20), (40 * k % 256, 255 - 30 * k % 256, 90))


def test_the_backend_is_chosen_at_load_and_the_gguf_is_written_once(checkpoint, llamacpp, cache_dir):
    assert llamacpp.backend.name == "llamacpp" and llamacpp.backend.adapter is not None
    written = {p: p.stat().st_mtime_ns for p in (cache_dir / "gguf").rglob("*.gguf")}
    assert len(written) == 2  # the LLM and its LoRA adapter
    again = load_model(str(checkpoint), device="cpu", backend="llamacpp", quantization="f32")
    assert again.backend.name == "llamacpp"
    assert {p: p.stat().st_mtime_ns for p in (cache_dir / "gguf").rglob("*.gguf")} == written  # nothing rewritten


def test_a_conversation_gives_the_same_tokens_as_the_transformers_forward(llamacpp, reference):
    """f32 GGUF, adapter applied by llama.cpp at run time: the greedy tokens of the float32 transformers forward
    with the adapter merged; the first logits within 1e-3 of their scale."""
    for k, question in enumerate(QUESTIONS):
        assert generate(llamacpp, ask(question), [picture(k)], gen=GREEDY) == generate(
            reference, ask(question), [picture(k)], gen=GREEDY
        )
    encoded = reference.processor.encode(ask(QUESTIONS[0]), [picture(0)], add_generation_prompt=True, labels=False)
    from mllm.generation import image_features

    embeds = reference.embed(encoded.input_ids[None], image_features=image_features(reference, encoded))[0]
    ours = llamacpp.backend.prefill([llamacpp.backend.new_cache()], [embeds])[0]
    theirs = reference.backend.prefill([reference.backend.new_cache()], [embeds])[0]
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() / scale < 1e-3


def test_the_adapter_matters(checkpoint, llamacpp, cache_dir):
    """Without its adapter the same GGUF answers otherwise: the adapter really is applied."""
    from mllm.backends.llamacpp import LlamaCppBackend

    gguf = next(p for p in (cache_dir / "gguf").rglob("*.gguf") if "lora" not in p.parent.name)
    bare = LlamaCppBackend(gguf)
    encoded = llamacpp.processor.encode(ask("hi"), [picture(1)], add_generation_prompt=True, labels=False)
    from mllm.generation import image_features

    embeds = llamacpp.embed(encoded.input_ids[None], image_features=image_features(llamacpp, encoded))[0]
    with_adapter = llamacpp.backend.prefill([llamacpp.backend.new_cache()], [embeds])[0]
    without = bare.prefill([bare.new_cache()], [embeds])[0]
    assert (with_adapter - without).abs().max() > 0.05 * with_adapter.abs().max()


def test_replies_decoded_together_are_the_replies_decoded_alone(llamacpp):
    engine = ChatEngine(llamacpp, name="tiny", max_concurrency=8, gen=GREEDY, prefix_cache_mib=0)
    requests = [
        [{"role": "user", "content": [{"type": "image", "image": picture(k)}, {"type": "text", "text": q}]}]
        for k, q in enumerate(QUESTIONS + QUESTIONS[:3])
    ]
    together: list[str | None] = [None] * len(requests)

    def send(k: int) -> None:
        together[k] = "".join(engine.complete(requests[k], gen=GREEDY))

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    alone = ["".join(engine.complete(r, gen=GREEDY)) for r in requests]
    assert together == alone and len(set(alone)) > 1
    assert engine.batcher.batched_tokens / engine.batcher.steps > 1  # they really decoded together


def test_a_session_reuses_its_cache_and_rolls_back(llamacpp):
    session = ChatSession(llamacpp, gen=GREEDY)
    first = "".join(session.send(QUESTIONS[0], [picture(0)]))
    second = "".join(session.send(QUESTIONS[1]))
    fresh = ChatSession(llamacpp, gen=GREEDY)
    fresh.messages = [m for m in session.messages[:2]]
    fresh.images = list(session.images)
    messages = session.messages[:3]
    whole = generate(llamacpp, messages, session.images, gen=GREEDY)
    assert second == whole and first  # the cached turn equals the whole conversation encoded afresh


def test_the_prefix_cache_reuses_a_prompt_and_answers_the_same(llamacpp):
    engine = ChatEngine(llamacpp, name="tiny", gen=GREEDY)
    request = [{"role": "user", "content": [{"type": "image", "image": picture(3)}, {"type": "text", "text": "hi"}]}]
    first = engine.complete(request, gen=GREEDY)
    first_text = "".join(first)
    again = engine.complete(
        request + [{"role": "assistant", "content": first_text}, {"role": "user", "content": "more"}]
    )
    text = "".join(again)
    assert again.cached_tokens > 0
    uncached = ChatEngine(llamacpp, name="tiny", gen=GREEDY, prefix_cache_mib=0)
    assert text == "".join(
        uncached.complete(request + [{"role": "assistant", "content": first_text}, {"role": "user", "content": "more"}])
    )


def test_cancelled_and_finished_replies_give_their_sequences_back(llamacpp):
    import gc

    backend = llamacpp.backend
    engine = ChatEngine(
        llamacpp, name="tiny", gen=GenerationConfig(max_new_tokens=200, ignore_eos=True), prefix_cache_mib=0
    )
    gc.collect()
    backend._clear_forgotten()
    free = len(backend._free)
    for _ in range(3):
        stream = engine.complete(ask_with_image("hi"))
        next(stream)  # decoding now: it holds a sequence
        stream.stop()
        list(stream)
        stream.close()
    del stream
    assert "".join(engine.complete(ask_with_image("hi"), gen=GREEDY))  # the backend answers on
    gc.collect()
    backend._clear_forgotten()
    assert len(backend._free) == free  # every sequence the replies held is free again


def ask_with_image(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": picture(2)}, {"type": "text", "text": text}]}]


def test_a_seed_gives_the_same_sampled_reply(llamacpp):
    gen = GenerationConfig(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    a = generate(llamacpp, ask("hi"), [picture(4)], gen=gen)
    b = generate(llamacpp, ask("hi"), [picture(4)], gen=gen)
    c = generate(llamacpp, ask("hi"), [picture(4)], gen=GenerationConfig(**{**gen.__dict__, "seed": 8}))
    assert a == b and a != c


def test_a_full_kv_store_takes_cells_back_from_the_prefix_cache(checkpoint, cache_dir):
    """A store of 320 cells: cached prefixes fill it, and new requests are still answered (the prefix cache's
    oldest entries give their cells back) where llama.cpp alone would fail to find a slot."""
    model = load_model(str(checkpoint), device="cpu", backend="llamacpp", quantization="f32")
    from mllm.backends.llamacpp import LlamaCppBackend

    gguf = model.backend
    model.backend = LlamaCppBackend(
        next(p for p in (cache_dir / "gguf").rglob("*.gguf") if "lora" not in p.parent.name),
        next(p for p in (cache_dir / "gguf").rglob("*.gguf") if "lora" in p.parent.name),
        kv_tokens=320,
    )
    del gguf
    cells = model.backend.lc.llama_n_ctx(model.backend.ctx)
    engine = ChatEngine(model, name="tiny", gen=GREEDY)
    requests = [
        [{"role": "user", "content": [{"type": "image", "image": picture(k)}, {"type": "text", "text": f"q{k} " * 8}]}]
        for k in range(12)
    ]
    held = 0
    for request in requests:  # each kept whole by the prefix cache: together more than the store holds
        stream = engine.complete(request, gen=GREEDY)
        assert "".join(stream)
        held += stream.prompt_tokens + stream.completion_tokens
    assert held > cells
    assert engine.prefix_cache.stats()["prefix_cache_entries"] < len(requests)  # some gave their cells back
