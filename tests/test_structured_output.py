"""Structured output: `response_format` holds the reply to a JSON schema by a token mask (`mllm.constrained`), on
every decode backend and for each reply of a batch with its own schema; served for real by uvicorn on loopback and
driven by the `openai` client. The tiny random model writes whatever the mask leaves it; the default model (slow)
answers 20 requests out of 20 with JSON that validates."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from conftest import tiny_model_as
from PIL import Image, ImageDraw

from app.api import create_app, serving
from app.engine import ChatEngine
from mllm.constrained import Grammar
from mllm.errors import GrammarError
from mllm.generation import GenerationConfig, Reply
from mllm.loading import load_model

# Schemas whose documents are short whatever a random model prefers (bounded strings, numbers and arrays).
SCHEMAS = {
    "shape": {
        "type": "object",
        "properties": {
            "color": {"type": "string", "enum": ["red", "green", "blue"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
            "present": {"type": "boolean"},
        },
        "required": ["color", "count", "present"],
        "additionalProperties": False,
    },
    "label": {
        "type": "object",
        "properties": {"label": {"type": "string", "maxLength": 6}, "score": {"type": "integer", "maximum": 99}},
        "required": ["label", "score"],
        "additionalProperties": False,
    },
    "list": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["cat", "dog", None]}, "minItems": 1, "maxItems": 3},
            "nested": {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}},
                "required": ["ok"],
                "additionalProperties": False,
            },
        },
        "required": ["tags", "nested"],
        "additionalProperties": False,
    },
    "choice": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 5}, {"const": "none"}]},
}


def schema_format(name: str, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": strict}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_a_reply_under_a_schema_validates_and_ends_with_the_document(tiny_model, one_thread, name):
    processor = tiny_model.processor
    grammar = Grammar.json_schema(processor.tokenizer, processor.stop_token_ids, SCHEMAS[name])
    encoded = processor.encode([{"role": "user", "content": "hi"}], None, add_generation_prompt=True, labels=False)
    for seed in range(3):
        gen = GenerationConfig(max_new_tokens=200, temperature=1.0, seed=seed, constraint=grammar)
        answer = Reply(tiny_model, encoded.input_ids, gen)
        text = "".join(answer)
        assert answer.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMAS[name])


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"type": "object", "properties": {"a": {"type": "strin"}}}, ["properties/a/type", "strin"]),
        ({"type": "object", "required": "a"}, ["required", "not of type 'array'"]),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, ["missing"]),
        (["not", "an", "object"], ["JSON object"]),
    ],
)
def test_an_invalid_schema_is_a_grammar_error_naming_the_problem(tiny_model, schema, words):
    processor = tiny_model.processor
    with pytest.raises(GrammarError) as error:
        Grammar.json_schema(processor.tokenizer, processor.stop_token_ids, schema)
    for word in words:
        assert word in str(error.value)


def test_strict_refuses_a_keyword_the_grammar_cannot_enforce_and_lenient_ignores_it(tiny_model):
    processor = tiny_model.processor
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "dependentSchemas": {"a": {}}}
    with pytest.raises(GrammarError, match="dependentSchemas"):
        Grammar.json_schema(processor.tokenizer, processor.stop_token_ids, schema, strict=True)
    Grammar.json_schema(processor.tokenizer, processor.stop_token_ids, schema, strict=False)


# ---- the API, on the tiny model: float32 (transformers' forward) and the CPU default (llama.cpp) ----------------


@pytest.fixture(scope="module", params=["float32", "cpu-default"])
def client(request, tiny_config, tmp_path_factory):
    model = tiny_model_as(request.param, tiny_config, tmp_path_factory)
    engine = ChatEngine(model, name="tiny", max_concurrency=8, gen=GenerationConfig(max_new_tokens=8))
    with serving(create_app(engine)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def ask(client, response_format: dict, seed: int = 0):
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "describe it as JSON"}],
        response_format=response_format,
        max_tokens=200,
        temperature=1.0,
        seed=seed,
    )


def test_json_schema_replies_validate_alone_and_in_a_batch(client):
    for name in SCHEMAS:  # one at a time
        reply = ask(client, schema_format(name))
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMAS[name])
    # Eight at once, each with its own schema, decoding in one batch.
    names = sorted(SCHEMAS) * 2
    with ThreadPoolExecutor(len(names)) as pool:
        replies = list(pool.map(lambda k: ask(client, schema_format(names[k]), seed=k), range(len(names))))
    for name, reply in zip(names, replies, strict=True):
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMAS[name])


def test_text_format_and_a_streamed_schema_reply(client):
    plain = ask(client, {"type": "text"})
    assert plain.choices[0].message.content is not None
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        response_format=schema_format("shape"),
        max_tokens=200,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMAS["shape"])


@pytest.mark.parametrize(
    "response_format, param, words",
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "2"}}},
            "response_format.json_schema.schema",
            ["minProperties", "not of type 'integer'"],
        ),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema", ["schema is required"]),
        ({"type": "json_schema"}, "response_format.json_schema", ["schema is required"]),
        ({"type": "xml"}, "response_format.type", ["json_schema"]),
        ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "response_format.json_schema.name", []),
    ],
)
def test_a_bad_response_format_is_a_400_naming_the_problem(client, response_format, param, words):
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, response_format)
    body = error.value.body
    assert body["param"] == param, body
    for word in words:
        assert word in body["message"], body


# ---- the default model: its JSON validates on 20 requests out of 20 ----------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "shape": {"type": "string", "enum": ["circle", "square", "triangle"]},
        "color": {"type": "string", "maxLength": 12},
        "count": {"type": "integer", "minimum": 0, "maximum": 10},
        "objects": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
    },
    "required": ["shape", "color", "count", "objects"],
    "additionalProperties": False,
}


@pytest.mark.slow
def test_the_default_model_answers_twenty_schema_requests_with_valid_json():
    image = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(image).ellipse((40, 40, 180, 180), fill=(220, 20, 20))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    picture = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    engine = ChatEngine(load_model("default", device="cpu"), name="default", max_concurrency=20)
    with serving(create_app(engine)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)

        def one(k: int):
            fmt = {"type": "json_schema", "json_schema": {"name": "scene", "schema": PERSON, "strict": True}}
            if k % 4 == 3:
                fmt = {"type": "json_object"}
            return client.chat.completions.create(
                model="default",
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": picture}},
                            {"type": "text", "text": f"Describe the shapes as JSON (answer {k})."},
                        ],
                    }
                ],
                response_format=fmt,
                max_tokens=160,
                temperature=0.7,
                seed=k,
            )

        with ThreadPoolExecutor(20) as pool:
            replies = list(pool.map(one, range(20)))
    for k, reply in enumerate(replies):
        document = json.loads(reply.choices[0].message.content)
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(document, {"type": "object"} if k % 4 == 3 else PERSON)
