"""`logprobs` / `top_logprobs` in OpenAI's shape (streamed and not) and `n` choices, on the real server on loopback
driven by the `openai` client: the numbers are the model's own (checked against a plain forward of the prompt),
the choices are each their own reply (choice k samples with seed + k), side by side in the batch."""

from __future__ import annotations

import openai
import pytest
import torch
from conftest import tiny_model_as

from app.api import create_app, serving
from app.engine import ChatEngine
from mllm.generation import GenerationConfig

MESSAGES = [{"role": "user", "content": "what is in the picture"}]


@pytest.fixture(scope="module", params=["float32", "cpu-default"])
def served(request, tiny_config, tmp_path_factory):
    model = tiny_model_as(request.param, tiny_config, tmp_path_factory)
    engine = ChatEngine(model, name="tiny", max_concurrency=4, gen=GenerationConfig(max_new_tokens=8))
    with serving(create_app(engine)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        client.engine = engine  # for the tests that read its counters
        yield model, client


def ask(client, messages=MESSAGES, **kwargs):
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, **kwargs)


def test_logprobs_are_the_models_own_and_name_the_tokens(served):
    model, client = served
    reply = ask(client, logprobs=True, top_logprobs=5, extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == choice.message.content
    for entry in content:
        assert len(entry.top_logprobs) == 5 and entry.logprob <= 0
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == pytest.approx(tops[0])  # greedy
        assert bytes(entry.bytes).decode() == entry.token
    # The first token's log probability from a plain forward of the prompt (float32; llama.cpp runs the weights
    # as a quantized GGUF: within a few hundredths here).
    encoded = model.processor.encode(MESSAGES, None, add_generation_prompt=True, labels=False)
    with torch.inference_mode():
        logits = model.llm(inputs_embeds=model.embed(encoded.input_ids[None])).logits[0, -1]
    expected = logits.float().log_softmax(-1)
    tolerance = 2e-3 if model.backend.name != "llamacpp" else 0.15
    assert content[0].logprob == pytest.approx(float(expected.max()), abs=tolerance)
    # Streamed: the same entries, spread over the chunks.
    chunks = list(ask(client, logprobs=True, top_logprobs=5, stream=True, extra_body={"ignore_eos": True}))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    # Without top_logprobs: the chosen tokens only; without logprobs: none.
    assert ask(client, logprobs=True).choices[0].logprobs.content[0].top_logprobs == []
    assert ask(client).choices[0].logprobs is None


def test_n_choices_are_each_their_own_reproducible_reply(served):
    _, client = served
    sampled = {"temperature": 1.5, "seed": 11, "extra_body": {"ignore_eos": True}}
    before = client.engine.info()
    fresh = [{"role": "user", "content": "a prompt no request sent before"}]  # nothing of it in the prefix cache
    three = ask(client, fresh, n=3, **sampled)
    after = client.engine.info()
    # The prompt was prefilled once: each choice copied all of it but the last position from the prefix cache (the
    # one prefill may itself have reused the template's opening from an earlier request's entry).
    shared = after["prefix_cache_reused_tokens"] - before["prefix_cache_reused_tokens"]
    prompt = three.usage.prompt_tokens
    assert 3 * (prompt - 1) <= shared < 3 * (prompt - 1) + prompt
    three = ask(client, n=3, **sampled)
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = [c.message.content for c in three.choices]
    assert len(set(texts)) > 1
    assert three.usage.completion_tokens == 18
    assert [c.message.content for c in ask(client, n=3, **sampled).choices] == texts  # the same seed: the same
    for k in range(3):  # choice k is the reply a single request with seed + k gets
        alone = ask(client, temperature=1.5, seed=11 + k, extra_body={"ignore_eos": True})
        assert alone.choices[0].message.content == texts[k]
    streamed = ["", "", ""]
    finished = [None] * 3
    for chunk in ask(client, n=3, stream=True, logprobs=True, **sampled):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            finished[choice.index] = choice.finish_reason or finished[choice.index]
    assert streamed == texts and finished == ["length"] * 3


@pytest.mark.parametrize(
    "kwargs, param, words",
    [
        ({"top_logprobs": 3}, "top_logprobs", "needs logprobs: true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
        ({"n": 9}, "n", "8"),
        ({"n": 0}, "n", "1"),
        ({"n": 5}, "n", "at most 4 replies at once"),
    ],
)
def test_bad_logprobs_and_n_are_400_naming_them(served, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as error:
        ask(served[1], **kwargs)
    assert error.value.body["param"] == param and words in error.value.body["message"]


def test_a_client_gone_mid_stream_stops_every_choice(served):
    """Hanging up on a streamed n=3 reply stops its three replies, so their places free at once: the n=4 request
    after it (four places in all) is answered in a few steps, where three choices decoding on would hold three
    places for 400 slowed steps (12 s)."""
    import time

    import httpx

    model, client = served
    step = model.backend.step

    def slowed(*args, **kwargs):  # every decode step of every backend 30 ms slower
        time.sleep(0.03)
        return step(*args, **kwargs)

    model.backend.step = slowed
    try:
        url = str(client.base_url).rstrip("/")
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 400, "n": 3, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            assert next(r.iter_lines()).startswith("data: ")  # one event, then hang up
        started = time.monotonic()
        reply = ask(client, n=4, extra_body={"ignore_eos": True})
        elapsed = time.monotonic() - started
    finally:
        del model.backend.step  # the class's own method again
    assert [c.finish_reason for c in reply.choices] == ["length"] * 4
    assert elapsed < 5, elapsed
