"""ChatSession.rollback with images: every image's slots hold the same token id, so the prefix match alone would
keep a dropped image's keys/values for a new image in the same place."""

from __future__ import annotations

from mllm.generation import GenerationConfig, generate
from mllm.session import ChatSession


def test_new_image_after_rollback_is_prefilled_again(tiny_model, images):
    gen = GenerationConfig(max_new_tokens=4, ignore_eos=True)
    session = ChatSession(tiny_model, gen=gen)
    session.ask("what color", images[:1])
    session.rollback(0)
    answer = session.ask("what color", images[1:])  # same text, another image
    ids = tiny_model.processor.encode(session.messages[:-1], session.images, add_generation_prompt=True).input_ids
    first_slot = ids.tolist().index(tiny_model.image_token_id)
    assert session.last_prefill_tokens == len(ids) - first_slot  # the text before the image is still reused
    assert answer == generate(tiny_model, session.messages[:-1], session.images, gen=gen)


def test_rollback_without_dropping_images_keeps_the_cache(tiny_model, images):
    gen = GenerationConfig(max_new_tokens=4, ignore_eos=True)
    session = ChatSession(tiny_model, gen=gen)
    session.ask("what color", images[:1])
    session.ask("and now")
    session.rollback(2)  # regenerate the second answer: the image stays
    answer = session.ask("and now")
    assert session.last_prefill_tokens < tiny_model.tokens_per_image
    assert answer == generate(tiny_model, session.messages[:-1], session.images, gen=gen)
