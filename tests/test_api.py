"""The OpenAI-compatible API, served for real by uvicorn on loopback and driven by the `openai` client, on the
tiny model in float32, on torch's int4 forward and on the CPU default backend (llama.cpp: its GGUF written once)."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from PIL import Image

from app.api import create_app, serving
from app.engine import ChatEngine
from mllm.assembly import build_model
from mllm.checkpoint import save_pretrained
from mllm.generation import GenerationConfig
from mllm.loading import load_model

KEY = "test-key"


@pytest.fixture(scope="module", params=["float32", "int4", "cpu-default"])
def model(request, tiny_config, tmp_path_factory):
    torch.manual_seed(0)
    full = build_model(tiny_config, device="cpu").eval()
    if request.param == "float32":
        return full
    directory = tmp_path_factory.mktemp("ckpt") / "ckpt"
    save_pretrained(full, directory)
    if request.param == "int4":
        return load_model(str(directory), device="cpu", backend="int4")
    return load_model(str(directory), device="cpu")  # what `mllm api` serves on a CPU: llama.cpp today


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("allowed")
    Image.new("RGB", (24, 24), (0, 160, 0)).save(directory / "green.png")
    return directory


@pytest.fixture(scope="module")
def server(model, image_dir):
    engine = ChatEngine(model, name="tiny", max_concurrency=4, max_queue=32, gen=GenerationConfig(max_new_tokens=8))
    with serving(create_app(engine, api_key=KEY, allowed_image_dir=image_dir)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def data_uri(color: tuple[int, int, int], size: int = 20) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask(text: str, url: str | None = None) -> list[dict]:
    content = [{"type": "text", "text": text}]
    if url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": content}]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_completion_with_an_image_streams_the_same_text(client):
    messages = ask("what color is it", data_uri((200, 0, 0)))
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > 16
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_ignore_eos_runs_every_answer_to_max_tokens(client):
    """vLLM's `ignore_eos` (sent in extra_body): the answer is max_tokens long whatever the model writes."""
    for n in (3, 11):
        reply = client.chat.completions.create(
            model="tiny", messages=ask("hi"), max_tokens=n, extra_body={"ignore_eos": True}
        )
        assert reply.usage.completion_tokens == n and reply.choices[0].finish_reason == "length"
    from app.api_request import ChatRequest, gen_config

    request = ChatRequest(model="tiny", messages=ask("hi"), ignore_eos=True)
    assert gen_config(request, GenerationConfig()).ignore_eos  # the stop tokens are off (`Sequence.stops`)
    assert not gen_config(ChatRequest(model="tiny", messages=ask("hi")), GenerationConfig()).ignore_eos


def test_stop_string_cuts_the_answer(client):
    messages = ask("describe the image")
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12).choices[0].message.content
    stop = full[4:6]
    cut = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.find(stop)] and cut.finish_reason == "stop"


def test_local_image_only_inside_the_allowed_dir(client, image_dir):
    by_path = client.chat.completions.create(
        model="tiny", messages=ask("hi", f"file://{image_dir}/green.png"), max_tokens=4, temperature=0
    )
    inline = client.chat.completions.create(
        model="tiny", messages=ask("hi", data_uri((0, 160, 0), 24)), max_tokens=4, temperature=0
    )
    assert by_path.usage.completion_tokens >= 1  # the same pixels by path and inline: the same answer
    assert by_path.choices[0].message.content == inline.choices[0].message.content
    assert by_path.usage.prompt_tokens == inline.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="outside the allowed image directory"):
        client.chat.completions.create(model="tiny", messages=ask("hi", f"{image_dir}/../../etc/passwd"))


@pytest.mark.parametrize(
    "url, message, code",
    [
        ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "not a readable image", "invalid_image"),
        ("data:image/png;base64,@@@", "base64 data is malformed", "invalid_image"),
        ("https://example.com/cat.png", "remote image URLs are not fetched", "invalid_image_url"),
    ],
)
def test_bad_images_are_400_in_openai_shape(client, url, message, code):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=ask("what is it", url))
    error = err.value.response.json()["error"]
    assert message in error["message"] and error["code"] == code and error["type"] == "invalid_request_error"


def test_too_many_images_is_400(client):
    messages = ask("so many", data_uri((1, 2, 3)))
    messages[0]["content"] = messages[0]["content"][:1] * 9 + messages[0]["content"][1:]
    with pytest.raises(openai.BadRequestError, match="at most 8"):
        client.chat.completions.create(model="tiny", messages=messages)


def test_api_key_unknown_model_and_schema_errors(server, client):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    response = httpx.get(f"{server}/v1/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=ask("hi"))
    headers = {"Authorization": f"Bearer {KEY}"}
    for body, param in [
        ({"model": "tiny"}, "messages"),
        ({"model": "tiny", "messages": ask("x"), "temperature": 5}, "temperature"),
    ]:
        response = httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_full_queue_is_503_with_retry_after_and_a_client_gone_frees_its_place(model):
    engine = ChatEngine(model, name="tiny", max_concurrency=1, max_queue=0, gen=GenerationConfig(max_new_tokens=4))
    release, started = threading.Event(), []
    generate = engine._generate

    def held(encoded, gen, stream):  # the first reply keeps its place until released
        started.append(1)
        if len(started) == 1:
            release.wait(60)
        yield from generate(encoded, gen, stream)

    engine._generate = held
    try:
        with serving(create_app(engine)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
            first = client.chat.completions.create(model="tiny", messages=ask("hi"), stream=True)
            next(iter(first))
            with pytest.raises(openai.InternalServerError) as err:
                client.chat.completions.create(model="tiny", messages=ask("hi"))
            assert err.value.status_code == 503 and "busy" in err.value.message
            assert err.value.response.headers["Retry-After"] == "1"
            first.close()  # the client goes away: its place must be freed
            release.set()
            deadline = time.monotonic() + 30
            while engine.info()["running"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert engine.info()["running"] == 0
            again = client.chat.completions.create(model="tiny", messages=ask("hi"), max_tokens=2)
            assert again.usage.completion_tokens >= 1
    finally:
        release.set()


def test_sixteen_concurrent_conversations_do_not_cross_talk(model):
    """Each greedy answer equals the same request sent alone, token for token, where the README promises it:
    float32 batches exactly; int4 with --exact-batching (its default wide steps go through a bf16 copy, within
    1% of each row's logits: tests/test_batching.py)."""
    engine = ChatEngine(
        model,
        name="tiny",
        max_concurrency=16,
        gen=GenerationConfig(max_new_tokens=8),
        exact_batching=True,
        prefix_cache_mib=0,
    )
    requests = [ask(f"what is in image {i}?", data_uri((16 * i, 255 - 16 * i, (40 * i) % 256))) for i in range(16)]
    with serving(create_app(engine)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

        def send(i: int) -> str:
            if i % 2:  # half of them stream
                chunks = client.chat.completions.create(model="tiny", messages=requests[i], max_tokens=8, stream=True)
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reply = client.chat.completions.create(model="tiny", messages=requests[i], max_tokens=8)
            return reply.choices[0].message.content

        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(send, range(16)))
        alone = [send(i) for i in range(16)]
    assert together == alone
    assert len(set(alone)) > 1  # the images do change the answers, so a mix-up would show


# ---- requests that must never wedge the server or reach a 500 --------------------------------------------------
def _post(server: str, body, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
    return httpx.post(f"{server}/v1/chat/completions", headers=headers, timeout=60, **kwargs, json=body)


def test_a_huge_request_is_refused_at_once_with_context_length_exceeded(server, model):
    words = "lorem ipsum dolor sit amet " * 12_000  # 60,000 words, far past the tiny model's 512 tokens
    r = _post(server, {"model": "tiny", "messages": [{"role": "user", "content": words}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    # Refused from its length in characters, before the template or the tokenizer ran.
    assert "324,000 characters, more than this model's limit of 512 tokens" in r.json()["error"]["message"]
    just_over = "hello " * 600  # a few characters per token: only the tokenizer can tell, and it does
    r = _post(server, {"model": "tiny", "messages": [{"role": "user", "content": just_over}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text


def test_max_tokens_past_the_context_is_refused_and_the_default_is_clamped(server, model):
    r = _post(server, {"model": "tiny", "messages": ask("hello"), "max_tokens": 100_000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert "maximum context length is 512 tokens" in r.json()["error"]["message"]
    # A prompt 2 tokens short of the context, no max_tokens: the server's default (8) is cut to what fits.
    n = next(n for n in range(100, 300) if len(model.processor.encode(ask("hi " * n), [], True).input_ids) >= 510)
    prompt = len(model.processor.encode(ask("hi " * n), [], True).input_ids)
    r = _post(server, {"model": "tiny", "messages": ask("hi " * n), "temperature": 0})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == prompt and usage["prompt_tokens"] + usage["completion_tokens"] <= 512


def test_text_the_tokenizer_cannot_take_is_a_400_naming_message_and_part(server):
    def post_raw(body: str) -> httpx.Response:  # JSON escapes: the client library would refuse to send these
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        return httpx.post(f"{server}/v1/chat/completions", content=body.encode(), headers=headers, timeout=60)

    r = post_raw(
        '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi \\ud800"}]}]}'
    )
    assert r.status_code == 400, r.text
    assert "message 0, part 0" in r.json()["error"]["message"] and "surrogate" in r.json()["error"]["message"]
    r = post_raw('{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff alone"}]}')
    assert r.status_code == 400 and "message 0" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("kind", ["input_audio", "file", "refusal", "input_image"])
def test_unsupported_content_parts_are_refused_by_name(server, kind):
    messages = [{"role": "user", "content": [{"type": kind, kind: {"data": "AAAA"}}, {"type": "text", "text": "hi"}]}]
    r = _post(server, {"model": "tiny", "messages": messages})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert f"content part type {kind!r} is not supported; send text and image_url parts" in error["message"]
    assert error["param"] == "messages[0].content[0]"


def test_a_body_over_the_limit_is_413_with_or_without_content_length(model):
    engine = ChatEngine(model, name="tiny", gen=GenerationConfig(max_new_tokens=2))
    with serving(create_app(engine, max_body_bytes=10_000)) as url:
        big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 20_000}]}
        r = httpx.post(f"{url}/v1/chat/completions", json=big, timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text

        def chunks():  # no Content-Length: the body arrives chunked
            yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
            for _ in range(20):
                yield b"x" * 1000
            yield b'"}]}'

        json_type = {"Content-Type": "application/json"}
        r = httpx.post(f"{url}/v1/chat/completions", content=chunks(), headers=json_type, timeout=30)
        assert r.status_code == 413, r.text
        small = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=small, timeout=30).status_code == 200

        def small_chunks():
            yield b'{"model": "tiny", "messages": [{"role": "user", "content": "hel'
            yield b'lo"}]}'

        r = httpx.post(f"{url}/v1/chat/completions", content=small_chunks(), headers=json_type, timeout=30)
        assert r.status_code == 200, r.text


def test_a_huge_request_does_not_delay_a_normal_one_sent_with_it(server):
    words = "lorem ipsum dolor sit amet " * 12_000
    huge = {"model": "tiny", "messages": [{"role": "user", "content": words}]}
    normal = {"model": "tiny", "messages": ask("what color"), "max_tokens": 4, "temperature": 0}
    with ThreadPoolExecutor(2) as pool:
        refused, answered = pool.submit(_post, server, huge), pool.submit(_post, server, normal)
        refused, answered = refused.result(), answered.result()
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    assert answered.status_code == 200 and answered.json()["usage"]["completion_tokens"] >= 1
    alone = _post(server, normal).json()["choices"][0]["message"]["content"]
    assert answered.json()["choices"][0]["message"]["content"] == alone


def test_a_client_gone_mid_stream_frees_its_place_and_the_server_answers_on(server):
    body = {"model": "tiny", "messages": ask("hello"), "max_tokens": 400, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    for _ in range(3):
        with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # one event, then hang up
    r = _post(server, {"model": "tiny", "messages": ask("what color"), "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
