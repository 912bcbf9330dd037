"""Requests that once stalled the server, each sent through a real server on loopback: a chunked (streamed)
body, a tiny image with a huge canvas, long histories, unbounded stop strings, parameters we do not implement,
bodies sent without the key, clients that leave while queued. Each gets a clear 4xx (or its answer) while a
second client sent at the same time is answered normally."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from PIL import Image

from app.api import create_app, serving
from app.engine import ChatEngine
from mllm.assembly import build_model
from mllm.checkpoint import save_pretrained
from mllm.generation import GenerationConfig
from mllm.loading import load_model

KEY = "hostile-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model(tiny_config, tmp_path_factory):
    """The CPU default backend (llama.cpp today), as `mllm api` serves the tiny model."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ckpt") / "ckpt"
    save_pretrained(build_model(tiny_config, device="cpu").eval(), directory)
    return load_model(str(directory), device="cpu")


@pytest.fixture(scope="module")
def engine(model):
    return ChatEngine(model, name="tiny", max_concurrency=4, max_queue=8, gen=GenerationConfig(max_new_tokens=6))


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    Image.new("RGB", (16, 16), (0, 160, 0)).save(allowed / "green.png")
    with serving(create_app(engine, api_key=KEY, allowed_image_dir=allowed)) as url:
        yield url


def png_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask(text: str, url: str | None = None) -> list[dict]:
    content = [{"type": "text", "text": text}]
    if url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": content}]


def post(server: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{server}/v1/chat/completions", json=body, headers=AUTH, timeout=120, **kwargs)


def normal(server: str) -> httpx.Response:
    return post(server, {"model": "tiny", "messages": ask("what color is it"), "max_tokens": 3})


def with_a_normal_request(server: str, hostile) -> tuple[object, httpx.Response]:
    """Send `hostile()` and a normal request at the same time; both results."""
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(hostile)
        time.sleep(0.05)  # let the hostile one start first
        second = pool.submit(normal, server)
        return first.result(), second.result()


def assert_error(response: httpx.Response, status: int, code: str | None, *phrases: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error", error
    for phrase in phrases:
        assert phrase in error["message"], error["message"]
    return error


def assert_answered(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] >= 1


# ---- a chunked request body, streaming and not --------------------------------------------------------------
@pytest.mark.parametrize("stream", [True, False])
def test_a_chunked_request_body_is_answered_and_the_server_stays_up(server, stream):
    payload = json.dumps({"model": "tiny", "messages": ask("hi"), "stream": stream, "max_tokens": 4}).encode()

    def chunked():  # what httpx / requests send for a generator body: Transfer-Encoding: chunked, no length
        for i in range(0, len(payload), 7):
            yield payload[i : i + 7]

    def send() -> str:
        headers = {**AUTH, "Content-Type": "application/json"}
        with httpx.stream("POST", f"{server}/v1/chat/completions", content=chunked(), headers=headers, timeout=60) as r:
            assert r.status_code == 200 and "content-length" not in r.request.headers
            return r.read().decode()

    reply, other = with_a_normal_request(server, send)
    if stream:
        events = [line[6:] for line in reply.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        assert json.loads(reply)["choices"][0]["message"]["role"] == "assistant"
    assert_answered(other)
    assert httpx.get(f"{server}/health", timeout=10).json() == {"status": "ok"}


# ---- images -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(40_000, 1_000), (200_000, 200)])
def test_a_few_kb_image_with_a_huge_canvas_is_refused_and_others_are_answered(server, size):
    uri = png_uri(Image.new("1", size, 1))  # a few KB: one bit per pixel, all alike
    assert len(uri) < 60_000
    refused, other = with_a_normal_request(server, lambda: post(server, {"model": "tiny", "messages": ask("hi", uri)}))
    assert_error(refused, 400, "invalid_image", "image 1", f"{size[0]}x{size[1]}", "max_pixels")
    assert_answered(other)


def test_images_are_counted_before_any_is_decoded(engine):
    """100 image parts that would each fail to decode: the answer is the count, so none was decoded."""
    from app.scheduling import ChatError

    undecodable = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    content = [{"type": "image", "image": undecodable} for _ in range(100)] + [{"type": "text", "text": "hi"}]
    with pytest.raises(ChatError, match="100 images; this model takes at most 8") as err:
        engine.complete([{"role": "user", "content": content}])
    assert err.value.code == "too_many_images"


def test_the_server_keeps_only_model_sized_images(engine, model):
    """A queued request holds each image at the tower's input size, not the decoded original."""
    big = Image.new("RGB", (3000, 2000), (10, 200, 30))
    stream = engine.complete(
        [{"role": "user", "content": [{"type": "image", "image": big}, {"type": "text", "text": "hi"}]}]
    )
    try:
        side = model.processor.image_processor.image_size
        images = stream._start.args[0].images  # the encoded request that waits for its turn
        assert [image.size for image in images] == [(side, side)]
    finally:
        stream.close()


def test_a_nul_byte_in_a_local_image_path_is_a_400(server):
    for url in ("green\x00.png", "file:///green%00.png"):
        r = post(server, {"model": "tiny", "messages": ask("hi", url)})
        assert_error(r, 400, "invalid_image_url", "NUL byte")


# ---- long histories, characters, stop strings ---------------------------------------------------------------
def history(pairs: int, text: str = "what is it") -> list[dict]:
    messages = []
    for i in range(pairs):
        messages += [{"role": "user", "content": f"{text} {i}"}, {"role": "assistant", "content": "a circle"}]
    return messages + [{"role": "user", "content": "and now?"}]


def test_a_long_history_is_refused_by_the_context_and_too_many_messages_by_count(server):
    refused, other = with_a_normal_request(server, lambda: post(server, {"model": "tiny", "messages": history(500)}))
    assert_error(refused, 400, "context_length_exceeded", "limit of 512")
    assert_answered(other)
    r = post(server, {"model": "tiny", "messages": history(1000)})
    error = assert_error(r, 400, "invalid_request", "messages", "at most 1024")
    assert error["param"] == "messages"


def test_characters_past_the_limit_are_refused_before_any_encoding(server):
    r = post(server, {"model": "tiny", "messages": [{"role": "user", "content": "x" * 1_000_001}]})
    assert_error(r, 400, "context_length_exceeded", "1,000,001 characters", "limit is 1,000,000")


@pytest.mark.parametrize(
    "stop, phrase",
    [(["a", "b", "c", "d", "e"], "at most 4"), ("x" * 200_000, "200,000 characters; the limit is 256")],
)
def test_stop_sequences_are_bounded_like_openai(server, stop, phrase):
    r = post(server, {"model": "tiny", "messages": ask("hi"), "stop": stop})
    assert r.status_code == 400 and phrase in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"].startswith("stop")


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 10**7),
        ("max_completion_tokens", 0),
        ("seed", 2**64),
        ("temperature", -0.1),
        ("top_p", 0),
    ],
)
def test_numbers_out_of_range_are_refused_by_name(server, field, value):
    r = post(server, {"model": "tiny", "messages": ask("hi"), field: value})
    error = assert_error(r, 400, "invalid_request", field)
    assert error["param"] == field


# ---- parameters we do not implement are refused by name, neutral values are accepted ----------------------------
@pytest.mark.parametrize(
    "field, value, phrase",
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}], "tool calling"),
        ("tool_choice", "auto", "tool calling"),
        ("logit_bias", {"42": 5}, "logit_bias"),
        ("presence_penalty", 0.5, "presence_penalty"),
        ("frequency_penalty", 1.0, "frequency_penalty"),
        ("modalities", ["text", "audio"], "text only"),
        ("top_k", 5, "unrecognized request argument supplied: top_k"),
    ],
)
def test_parameters_we_do_not_implement_are_refused_by_name(server, field, value, phrase):
    r = post(server, {"model": "tiny", "messages": ask("hi"), field: value})
    error = assert_error(r, 400, "unsupported_parameter", field, phrase)
    assert error["param"] == field


def test_stream_options_without_stream_and_tool_messages_are_refused(server):
    r = post(server, {"model": "tiny", "messages": ask("hi"), "stream_options": {"include_usage": True}})
    assert_error(r, 400, "invalid_request", "stream_options is only allowed when stream is true")
    calls = [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    messages = ask("hi") + [{"role": "assistant", "content": None, "tool_calls": calls}]
    r = post(server, {"model": "tiny", "messages": messages})
    assert r.status_code == 400 and "messages[1].tool_calls: tool calling is not supported" in r.text


def test_neutral_values_and_metadata_are_accepted(server):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi", "name": "ann"}],
        "max_tokens": 2,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logprobs": False,
        "response_format": {"type": "text"},
        "tool_choice": "none",
        "user": "u-1",
        "metadata": {"run": "7"},
        "store": False,
    }
    assert_answered(post(server, body))


# ---- authentication before the body, /health, empty keys --------------------------------------------------------
def test_without_the_key_the_body_is_never_read(server):
    """A 60 MB Content-Length and no body at all: a 401 comes back at once, since nothing waits for the body."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {60 * 2**20}\r\n\r\n"
        )
        sock.sendall(head.encode())
        reply = b""
        while b"invalid_api_key" not in reply and (piece := sock.recv(65536)):  # times out if the body is awaited
            reply += piece
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 401") and "invalid_api_key" in reply


def test_health_tells_an_outsider_only_that_the_server_is_up(server):
    assert httpx.get(f"{server}/health", timeout=10).json() == {"status": "ok"}
    full = httpx.get(f"{server}/health", headers=AUTH, timeout=10).json()
    assert full["status"] == "ok" and {"running", "prefix_cache_hits", "feature_cache_hits"} <= set(full)


@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_key_is_refused_at_start(engine, key):
    with pytest.raises(ValueError, match="the API key is empty"):
        create_app(engine, api_key=key)


# ---- clients that leave while queued cost nothing ---------------------------------------------------------------
@pytest.fixture
def one_slot(model):
    """An engine that runs one reply at a time; its first reply holds the place until `release` is set."""
    engine = ChatEngine(model, name="tiny", max_concurrency=1, max_queue=4, gen=GenerationConfig(max_new_tokens=4))
    release, started = threading.Event(), []
    generate = engine._generate

    def counted(encoded, gen, stream):  # runs once a request is admitted, before its prefill
        started.append(len(encoded.input_ids))
        if len(started) == 1:
            release.wait(60)
        yield from generate(encoded, gen, stream)

    engine._generate = counted
    with serving(create_app(engine)) as url:
        yield engine, url, started, release
    release.set()


def wait_for(condition, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_while_queued_is_never_prefilled(one_slot, stream):
    engine, url, started, release = one_slot
    busy = {"model": "tiny", "messages": ask("first"), "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=busy, timeout=60) as first:
        next(first.iter_lines())
        assert wait_for(lambda: len(started) == 1)
        queued = {"model": "tiny", "messages": ask("second, much longer question"), "stream": stream}
        if stream:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=queued, timeout=60) as second:
                next(second.iter_lines())  # the role chunk comes at once; then the client hangs up
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/chat/completions", json=queued, timeout=1.0)
        assert wait_for(lambda: engine.info()["waiting"] == 0), "the request that left is still in the queue"
    release.set()
    assert wait_for(lambda: engine.info()["running"] == 0)
    assert len(started) == 1, f"{len(started)} requests were started; the one that left must not be"


def test_checking_a_request_never_takes_the_model_thread(engine):
    """Decoding its images, the template and the tokens run in the request's own thread: the model thread,
    which every running reply shares, only ever runs model steps."""
    on_model_thread = []
    run = engine.batcher.run

    def recording(fn, *args, **kwargs):
        on_model_thread.append(getattr(fn, "__qualname__", repr(fn)))
        return run(fn, *args, **kwargs)

    engine.batcher.run = recording
    try:
        picture = Image.new("RGB", (640, 480), (10, 200, 30))
        stream = engine.complete(
            [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "hi"}]}]
        )
        stream.close()
    finally:
        engine.batcher.run = run
    assert stream.prompt_tokens > 16 and on_model_thread == []
