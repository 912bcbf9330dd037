"""Fuzzing the HTTP API: whatever a client sends, the answer is a completion or an OpenAI-shaped 4xx error,
never a 500, and the server keeps answering. Bodies are built by hypothesis from what clients really send
(OpenAI chat requests) with every field bent: wrong types, odd numbers, lone surrogates, unknown content
parts, broken images. Bounded: a fixed number of examples against a tiny model on loopback."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.api import create_app, serving
from app.engine import ChatEngine
from mllm.assembly import build_model
from mllm.checkpoint import save_pretrained
from mllm.generation import GenerationConfig
from mllm.loading import load_model


@pytest.fixture(scope="module")
def url(tiny_config, tmp_path_factory):
    # The CPU default backend (llama.cpp today), as `mllm api` serves the tiny model.
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ckpt") / "ckpt"
    save_pretrained(build_model(tiny_config, device="cpu").eval(), directory)
    engine = ChatEngine(load_model(str(directory), device="cpu"), name="tiny", gen=GenerationConfig(4))
    with serving(create_app(engine, max_body_bytes=2**20)) as base:
        yield base


def _png(size: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
    st.sampled_from(["<image>", "<|im_end|>", "<|im_start|>assistant\n", "\x00", "\ufffd", "hi " * 300]),
)
junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
image_url = st.one_of(
    st.builds(lambda n: f"data:image/png;base64,{_png(n)}", st.integers(1, 40)),
    st.sampled_from(
        [
            "data:image/png;base64,AAAA",
            "data:image/png;base64,not base64!",
            "data:image/png,raw",
            "data:;base64,",
            "http://127.0.0.1:1/cat.png",
            "file:///etc/passwd",
            "/etc/passwd",
            "ftp://x/y.png",
            "",
        ]
    ),
    text,
)
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": text | junk}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": image_url})}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": image_url | junk}),
    st.fixed_dictionaries({"type": st.sampled_from(["input_audio", "file", "refusal", "input_image"]) | text}),
    junk,
)
good_role = st.sampled_from(["system", "developer", "user", "assistant"])
message = st.one_of(
    # well formed, in any order of roles (a conversation may open with the assistant)
    st.fixed_dictionaries({"role": good_role, "content": text | st.lists(part, max_size=3)}),
    st.fixed_dictionaries(
        {
            "role": good_role | st.sampled_from(["tool", "function"]) | text,
            "content": st.one_of(text, st.lists(part, max_size=4), st.none(), junk),
        },
        optional={"name": text, "tool_calls": junk},
    ),
)
request = st.fixed_dictionaries(
    {
        "model": st.just("tiny") | st.sampled_from(["default", "gpt-4o"]) | text,
        "messages": st.lists(message, min_size=1, max_size=4) | junk,
    },
    optional={
        "max_tokens": st.integers(-3, 12) | st.integers(2**31, 2**70) | junk,
        "max_completion_tokens": st.integers(-3, 12) | junk,
        "temperature": st.floats(0, 2) | st.floats(allow_nan=True) | junk,
        "top_p": st.floats(allow_nan=True) | junk,
        "seed": st.integers(-(2**70), 2**70) | junk,
        "stop": st.lists(text, max_size=5) | text | junk,
        "n": st.integers(-2, 9) | junk,
        "logprobs": st.booleans() | junk,
        "top_logprobs": st.integers(-1, 22) | junk,
        "response_format": st.sampled_from(
            [
                {"type": "text"},
                {"type": "json_object"},
                {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}},
                {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "nope"}}},
                {"type": "json_schema", "json_schema": {"name": "s", "schema": {"enum": []}}},
                {"type": "json_schema", "json_schema": {"name": "s", "strict": True, "schema": {"not": {}}}},
            ]
        )
        | junk,
        "stream": st.booleans() | junk,
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | junk}) | junk,
    },
)


def _check(response: httpx.Response, body: bytes) -> None:
    assert response.status_code < 500, f"{response.status_code} for {body[:300]!r}: {response.text[:300]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and isinstance(error["message"], str) and error["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", response.text[-300:]
        for event in events[:-1]:
            assert "error" not in json.loads(event), event
    else:
        assert response.json()["object"] == "chat.completion"


HI = [{"role": "user", "content": "hi"}]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(request, request, request, junk))
# Found by this fuzzer once, kept as fixed cases: a seed past 64 bits, a conversation opening with the assistant.
@example(body={"model": "tiny", "messages": HI, "temperature": 0.5, "seed": 2**70})
@example(body={"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]})
@example(body={"model": "tiny", "messages": [{"role": "user", "content": "hi \ud800"}]})
def test_no_request_body_gets_a_500(url, body):
    raw = json.dumps(body, allow_nan=True).encode()
    headers = {"Content-Type": "application/json"}
    _check(httpx.post(f"{url}/v1/chat/completions", content=raw, headers=headers, timeout=60), raw)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_no_byte_string_gets_a_500(url, raw):
    headers = {"Content-Type": "application/json"}
    _check(httpx.post(f"{url}/v1/chat/completions", content=raw, headers=headers, timeout=60), raw)
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"


# ---- the Ollama routes: the same promise, in Ollama's shapes ----------------------------------------------------
ollama_message = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": text},
        optional={"images": st.lists(st.builds(_png, st.integers(1, 40)) | text, max_size=2) | junk},
    ),
    st.fixed_dictionaries({"role": text | junk, "content": text | junk}, optional={"tool_calls": junk}),
    junk,
)
options = st.fixed_dictionaries(
    {},
    optional={
        "temperature": st.floats(allow_nan=True) | junk,
        "top_p": st.floats(allow_nan=True) | junk,
        "top_k": st.integers(-5, 100) | junk,
        "seed": st.integers(-(2**70), 2**70) | junk,
        "num_predict": st.integers(-3, 12) | junk,
        "stop": st.lists(text, max_size=5) | text | junk,
        "repeat_penalty": st.floats(allow_nan=True) | junk,
        "num_ctx": junk,
        "mirostat": st.integers(0, 2),
    },
)
ollama_common = {
    "model": st.sampled_from(["tiny", "tiny:latest", "llama3"]) | text,
    "stream": st.booleans() | junk,
    "format": st.sampled_from(["", "json", {"type": "object"}, {"type": "nope"}, "xml"]) | junk,
    "options": options | junk,
    "keep_alive": st.sampled_from(["5m", "0", -1, 0, "1h30m", "soon"]) | junk,
    "think": st.booleans() | junk,
}
ollama_chat = st.fixed_dictionaries(
    {"model": ollama_common["model"], "messages": st.lists(ollama_message, max_size=3) | junk},
    optional={k: v for k, v in ollama_common.items() if k != "model"},
)
ollama_generate = st.fixed_dictionaries(
    {"model": ollama_common["model"]},
    optional={
        **{k: v for k, v in ollama_common.items() if k != "model"},
        "prompt": text | junk,
        "system": text | junk,
        "images": st.lists(st.builds(_png, st.integers(1, 40)) | text, max_size=2) | junk,
        "raw": st.booleans() | junk,
        "context": junk,
    },
)


def _check_ollama(response: httpx.Response, body: bytes, route: str) -> None:
    assert response.status_code < 500, f"{response.status_code} for {body[:300]!r}: {response.text[:300]}"
    if response.status_code >= 400:
        assert isinstance(response.json()["error"], str) and response.json()["error"]
        return
    if route == "show":
        assert response.json()["capabilities"]
        return
    lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
    assert lines and lines[-1]["done"] is True and all("error" not in line for line in lines), response.text[-300:]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sent=st.one_of(
        st.tuples(st.just("chat"), ollama_chat),
        st.tuples(st.just("generate"), ollama_generate),
        st.tuples(st.sampled_from(["chat", "generate", "show"]), junk),
    )
)
def test_no_ollama_body_gets_a_500(url, sent):
    route, body = sent
    raw = json.dumps(body, allow_nan=True).encode()
    _check_ollama(httpx.post(f"{url}/api/{route}", content=raw, timeout=60), raw, route)
