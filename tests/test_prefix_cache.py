"""The stateless API's caches (`app.prefix_cache`) on the tiny model: a re-sent history prefills only its new
turn with the same answer, a changed image is a miss from that image on, the pool keeps to its budget, and
an image is encoded once."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from app.engine import ChatEngine
from app.prefix_cache import PrefixCache, image_hash, prefix_key
from mllm.generation import GenerationConfig

GREEDY = GenerationConfig(max_new_tokens=6, ignore_eos=True)


def _user(text, image=None):
    parts = [{"type": "image", "image": image}] if image is not None else []
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def _conversation(engine, turns, image):
    """Each turn re-sends the whole history, as an OpenAI client does; returns the answers."""
    messages, answers = [], []
    for k, text in enumerate(turns):
        messages.append(_user(text, image if k == 0 else None))
        stream = engine.complete(messages, gen=GREEDY)
        answers.append("".join(stream))
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers, stream


@pytest.fixture
def photo():
    return Image.new("RGB", (40, 30), (220, 30, 30))


def test_a_resent_history_prefills_only_the_new_turn_with_the_same_answers(tiny_model, photo):
    turns = ["what color is the circle", "how many objects are there", "describe the image", "yes or no"]
    cached_engine, plain_engine = ChatEngine(tiny_model, gen=GREEDY), ChatEngine(tiny_model, prefix_cache_mib=0)
    cached, last = _conversation(cached_engine, turns, photo)
    plain, _ = _conversation(plain_engine, turns, photo)
    assert cached == plain  # greedy, token for token
    stats = cached_engine.info()
    assert stats["prefix_cache_hits"] == len(turns) - 1 and stats["prefix_cache_misses"] == 1
    assert last.cached_tokens > last.prompt_tokens // 2  # the 4th turn reused most of its prompt
    assert stats["feature_cache_misses"] == 1  # the image was encoded once, in the first turn
    assert plain_engine.info()["prefix_cache_mib"] == 0


def test_a_changed_image_is_a_miss_from_that_image_on(tiny_model, photo):
    processor = tiny_model.processor
    other = Image.new("RGB", (40, 30), (30, 30, 220))
    messages = [_user("what color is the circle", photo)]
    enc_a = processor.encode([_user("what color", photo)], add_generation_prompt=True)
    enc_b = processor.encode([_user("what color", other)], add_generation_prompt=True)
    key_a = prefix_key(enc_a, tiny_model.image_token_id, [image_hash(photo)])
    key_b = prefix_key(enc_b, tiny_model.image_token_id, [image_hash(other)])
    first_slot = key_a.index(next(k for k in key_a if isinstance(k, tuple)))
    assert key_a[:first_slot] == key_b[:first_slot] and key_a[first_slot] != key_b[first_slot]
    engine = ChatEngine(tiny_model, gen=GREEDY)
    "".join(engine.complete(messages, gen=GREEDY))
    swapped = [_user("what color is the circle", other)]
    stream = engine.complete(swapped, gen=GREEDY)
    answer = "".join(stream)
    assert stream.cached_tokens <= first_slot  # nothing of the old image's KV is reused
    assert answer == "".join(ChatEngine(tiny_model, prefix_cache_mib=0).complete(swapped, gen=GREEDY))


def test_the_pool_never_exceeds_its_budget(tiny_model, photo):
    engine = ChatEngine(tiny_model, gen=GREEDY, prefix_cache_mib=0.05)  # a few short conversations' worth
    budget = engine.prefix_cache.budget_bytes
    for k in range(12):
        "".join(engine.complete([_user(f"question number {k} " * (k + 1), photo)], gen=GREEDY))
        assert engine.prefix_cache.used_bytes <= budget
    assert engine.info()["prefix_cache_entries"] >= 1


def test_a_cache_larger_than_the_budget_is_not_kept_and_lookups_leave_the_pool_alone(tiny_model, photo):
    engine = ChatEngine(tiny_model, gen=GREEDY)
    "".join(engine.complete([_user("what color is the circle", photo)], gen=GREEDY))
    pool = engine.prefix_cache
    ((key, (cache, size)),) = pool._entries.items()
    assert size == tiny_model.backend.nbytes(cache) > 0 and len(key) == cache.get_seq_length()
    copy, reused = pool.lookup(key + (5, 6))
    assert reused == len(key) and copy is not cache
    before = cache.layers[0].keys.clone()
    copy.layers[0].keys.zero_()  # the copy's storage is its own
    assert torch.equal(cache.layers[0].keys, before)
    copy.crop(-3)  # the caller's copy: the pooled cache keeps its length
    assert cache.get_seq_length() == len(key)
    tiny = PrefixCache(budget_bytes=size - 1, backend=tiny_model.backend)
    tiny.store(key, cache)
    assert tiny.used_bytes == 0
