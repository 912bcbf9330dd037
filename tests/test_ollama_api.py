"""The Ollama-compatible routes, served for real by uvicorn on loopback beside the OpenAI ones and driven by the
`ollama` Python client: chat and generate (streaming NDJSON and not), images, `format`, `options`, the model
listing routes, and the same key check, body limit and error rules as the OpenAI routes (in Ollama's shape)."""

from __future__ import annotations

import base64
import io
import json

import httpx
import jsonschema
import ollama
import pytest
from conftest import tiny_model_as
from PIL import Image, ImageDraw

from app.api import create_app, serving
from app.engine import ChatEngine
from mllm.generation import GenerationConfig
from mllm.loading import load_model

KEY = "test-key"


def png(color=(200, 0, 0), size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module", params=["float32", "cpu-default"])
def server(request, tiny_config, tmp_path_factory):
    model = tiny_model_as(request.param, tiny_config, tmp_path_factory)
    engine = ChatEngine(model, name="tiny", max_concurrency=4, gen=GenerationConfig(max_new_tokens=8))
    with serving(create_app(engine, api_key=KEY, max_body_bytes=2**20)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def test_the_listing_routes_describe_the_served_model(client, server):
    assert [m.model for m in client.list().models] == ["tiny:latest"]
    shown = client.show("tiny")
    assert shown.capabilities == ["completion", "vision"] and shown.modelinfo["llama.context_length"] > 0
    assert shown.details.family == "llama"
    assert [m.model for m in client.ps().models] == ["tiny:latest"]
    version = httpx.get(f"{server}/api/version", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert version["version"].count(".") == 2


def test_chat_with_an_image_streams_the_text_it_answers_whole(client):
    messages = [{"role": "user", "content": "what color is it", "images": [png()]}]
    whole = client.chat(model="tiny", messages=messages, stream=False, options={"num_predict": 6})
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 6
    assert whole.prompt_eval_count > 10 and whole.total_duration >= whole.eval_duration > 0
    parts = list(client.chat(model="tiny:latest", messages=messages, stream=True, options={"num_predict": 6}))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].done_reason == "length"
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == 6 and parts[-1].message.content == ""


def test_generate_with_system_prompt_and_image(client):
    reply = client.generate(model="tiny", prompt="describe", system="be brief", images=[png((0, 0, 200))])
    assert reply.done and reply.eval_count == 8 and isinstance(reply.response, str)
    pieces = list(
        client.generate(model="tiny", prompt="describe", system="be brief", images=[png((0, 0, 200))], stream=True)
    )
    assert "".join(p.response for p in pieces) == reply.response
    loaded = client.generate(model="tiny", prompt="")  # Ollama's way to load a model
    assert loaded.done and loaded.done_reason == "load"


def test_the_stream_is_newline_delimited_json(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 3}}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server}/api/chat", json=body, headers=headers, timeout=60) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert lines[-1]["eval_count"] == 3 and lines[-1]["created_at"].endswith("Z")


def test_format_holds_the_reply_to_a_schema_or_to_json(client):
    schema = {
        "type": "object",
        "properties": {"color": {"enum": ["red", "blue"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["color", "n"],
        "additionalProperties": False,
    }
    reply = client.chat(
        model="tiny",
        messages=[{"role": "user", "content": "hi", "images": [png()]}],
        format=schema,
        options={"num_predict": 100, "temperature": 0.8, "seed": 3},
    )
    assert reply.done_reason == "stop"
    jsonschema.validate(json.loads(reply.message.content), schema)
    reply = client.generate(model="tiny", prompt="hi", format=schema, options={"num_predict": 100})
    jsonschema.validate(json.loads(reply.response), schema)


def test_options_map_to_our_sampling(client):
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "tell me"}]}
    free = {"num_predict": 12, "temperature": 1.0, "top_k": 50, "top_p": 0.9, "repeat_penalty": 1.1}
    first = client.chat(**ask, options={**free, "seed": 7, "num_ctx": 4096, "num_thread": 2})
    again = client.chat(**ask, options={**free, "seed": 7})
    assert first.message.content == again.message.content and first.eval_count == 12
    greedy = client.chat(**ask, options={"num_predict": 12, "temperature": 0})
    cut = greedy.message.content[3:6]
    if cut.strip():
        stopped = client.chat(**ask, options={"num_predict": 12, "temperature": 0, "stop": [cut]})
        assert stopped.message.content == greedy.message.content[: greedy.message.content.index(cut)]
    everything = client.chat(**ask, options={"num_predict": -1}, keep_alive="5m")
    assert everything.done


@pytest.mark.parametrize(
    "options, words",
    [
        ({"mirostat": 2}, ["options.mirostat", "not supported"]),
        ({"top_q": 1}, ["options.top_q", "unknown option"]),
        ({"num_predict": 0}, ["options.num_predict"]),
        ({"temperature": -1}, ["temperature"]),
        ({"seed": "x"}, ["options.seed"]),
        ({"stop": ["a"] * 9}, ["options.stop", "at most 4"]),
        ({"repeat_last_n": 64}, ["repeat_last_n", "-1"]),
    ],
)
def test_options_we_cannot_honour_are_refused_by_name(client, options, words):
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], options=options)
    assert error.value.status_code == 400
    for word in words:
        assert word in error.value.error


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}, 404, ["llama3", "not found"]),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "hi", "images": ["%%%"]}]},
            400,
            ["messages[0].images[0]", "base64"],
        ),
        (
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi", "images": [base64.b64encode(b"no").decode()]}],
            },
            400,
            ["image"],
        ),
        ({"model": "tiny", "messages": [{"role": "tool", "content": "1"}]}, 400, ["tool calling"]),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "think": True}, 400, ["think"]),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "keep_alive": "soon"}, 400, ["keep_alive"]),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "format": "xml"}, 400, ["format"]),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "format": {"type": "strin"}},
            400,
            ["format", "not a valid JSON Schema"],
        ),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "colour": 1}, 400, ["colour", "remove"]),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}] * 2000}, 400, ["messages"]),
    ],
)
def test_bad_requests_get_an_ollama_error_naming_the_problem(server, body, status, words):
    r = httpx.post(f"{server}/api/chat", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    for word in words:
        assert word in error, error


def test_the_key_and_the_body_limit_hold_with_ollama_shaped_errors(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{server}/api/chat", json=body)
    assert r.status_code == 401 and "API key" in r.json()["error"]
    with pytest.raises(ollama.ResponseError) as error:
        ollama.Client(host=server).list()
    assert error.value.status_code == 401
    huge = {"model": "tiny", "prompt": "x" * (2 * 2**20)}
    r = httpx.post(f"{server}/api/generate", json=huge, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and "MiB" in r.json()["error"]
    # The OpenAI routes keep OpenAI's shape.
    r = httpx.post(f"{server}/v1/chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.slow
def test_the_ollama_client_chats_about_an_image_with_the_default_model():
    image = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(image).ellipse((40, 40, 180, 180), fill=(220, 20, 20))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    engine = ChatEngine(load_model("default", device="cpu"), name="default", max_concurrency=4)
    with serving(create_app(engine)) as url:
        client = ollama.Client(host=url, timeout=300)
        messages = [{"role": "user", "content": "What shape is in the image?", "images": [buf.getvalue()]}]
        whole = client.chat(model="default", messages=messages, stream=False, options={"temperature": 0})
        parts = list(client.chat(model="default", messages=messages, stream=True, options={"temperature": 0}))
    assert whole.done_reason == "stop" and "circle" in whole.message.content.lower()
    assert "".join(p.message.content for p in parts) == whole.message.content
