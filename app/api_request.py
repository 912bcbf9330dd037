"""The API's request side: OpenAI's chat request schema, its messages and images -> mllm's, and error shapes.

Everything here turns a client's mistake into an APIError (status, message, param, code) before the
engine sees the request; `error_response` writes any error in OpenAI's JSON shape
`{"error": {"message", "type", "param", "code"}}`. Images: base64 `data:` URIs, or local paths /
`file://` URLs inside the server's allowed image directory; remote http(s) URLs are refused (see app.api).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import replace
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mllm.constrained import Grammar
from mllm.errors import GrammarError
from mllm.generation import GenerationConfig
from mllm.logprobs import MAX_TOP_LOGPROBS, LogprobRecord

MAX_IMAGE_BYTES = 20 * 1024 * 1024


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"  # OpenAI sends this type for 401 too
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None
    """OpenAI's resolution hint; this server's models see every image at their one input size."""


SUPPORTED_PARTS = ("text", "image_url")

# Every request is bounded before it costs anything (see `check_limits`). OpenAI allows 4 stop sequences;
# the length bound keeps the stop matcher's work per text piece small.
MAX_MESSAGES = 1024
MAX_TEXT_CHARS = 1_000_000  # all text parts together; the model's context refuses far less (processor)
MAX_IMAGE_PARTS = 64  # counted before any is decoded; the model's own limit (max_images) is usually lower
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_TOKENS = 1_000_000  # a reply also stops at the context length
MAX_CHOICES = 8  # `n`: each choice takes a place in the batch


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    """Any OpenAI part type parses; `to_messages` refuses those other than SUPPORTED_PARTS by name."""
    text: str | None = None
    image_url: ImageURL | str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # refused by name in `check_parameters`, not by pydantic
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    """A participant's name: OpenAI passes it to its models as metadata; ours have no slot for it."""
    refusal: str | None = None
    """Sent back by clients in an assistant message's history; it carries nothing for the model."""


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """OpenAI requires a name (letters, digits, _ and -, up to 64); it labels the schema and nothing else."""
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None
    """True: a schema keyword the grammar cannot enforce is a 400. False / unset: such a keyword is ignored."""


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # refused by name in `check_parameters`, not by pydantic
    model: str
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    """Choices: each its own reply, decoded side by side; with a seed, choice k samples with seed + k."""
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # vLLM's extra sampling parameter (OpenAI clients send it in extra_body): the reply runs to max_tokens
    # whatever the model writes, so load benchmarks compare equal lengths.
    ignore_eos: bool = False
    # Accepted and without effect on the answer, as in OpenAI's API: labels for the caller's own records.
    user: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    store: Literal[False] | None = None
    """OpenAI keeps `store: true` completions for its dashboards; this server keeps nothing, so only false."""


def _unset(value) -> bool:
    return value is None or value is False or value == 0 or value == [] or value == {}


# OpenAI parameters this server does not implement: (is the value a no-op?, why it is refused and the fix).
# A client that asks for one of them gets a 400 naming it, never an answer that silently ignored it.
NOT_IMPLEMENTED: dict[str, tuple] = {
    "tools": (_unset, "tool calling is not supported by this server; leave tools out"),
    "tool_choice": (lambda v: v in (None, "none"), "tool calling is not supported by this server; leave it out"),
    "functions": (_unset, "function calling is not supported by this server; leave functions out"),
    "function_call": (lambda v: v in (None, "none"), "function calling is not supported; leave it out"),
    "parallel_tool_calls": (lambda v: v is None or isinstance(v, bool), "tool calling is not supported"),
    "logit_bias": (_unset, "logit_bias is not supported by this server; leave it out"),
    "presence_penalty": (_unset, "presence_penalty is not supported by this server; leave it out or send 0"),
    "frequency_penalty": (_unset, "frequency_penalty is not supported by this server; leave it out or send 0"),
    "modalities": (lambda v: v in (None, ["text"]), "this server answers in text only; send ['text'] or leave it out"),
    "audio": (_unset, "audio output is not supported; leave audio out"),
    "prediction": (_unset, "predicted outputs are not supported; leave prediction out"),
    "reasoning_effort": (_unset, "this server's models do not reason in steps; leave reasoning_effort out"),
    "verbosity": (_unset, "verbosity is not supported by this server; leave it out"),
    "web_search_options": (_unset, "web search is not supported: this server makes no outbound requests"),
}
# Message fields of OpenAI's tool calling: refused the same way (the model cannot see or make tool calls).
MESSAGE_NOT_IMPLEMENTED = ("tool_calls", "tool_call_id", "function_call", "audio")


def check_parameters(request: ChatRequest) -> None:
    """Refuse, by name, every parameter received that this server would otherwise ignore (a client asking for
    JSON must not get free text and no error). Unknown fields are refused as OpenAI refuses them."""
    for name, value in (request.model_extra or {}).items():
        if name not in NOT_IMPLEMENTED:
            raise APIError(
                400, f"unrecognized request argument supplied: {name}; remove it", name, "unsupported_parameter"
            )
        is_noop, why = NOT_IMPLEMENTED[name]
        if not is_noop(value):
            raise APIError(400, f"{name}: {why}", name, "unsupported_parameter")
    if request.stream_options is not None and not request.stream:
        message = "stream_options is only allowed when stream is true; set stream: true or leave stream_options out"
        raise APIError(400, message, "stream_options", "invalid_request")
    check_response_format(request.response_format)
    if request.top_logprobs is not None and not request.logprobs:
        message = "top_logprobs needs logprobs: true; send both, or leave top_logprobs out"
        raise APIError(400, message, "top_logprobs", "invalid_request")
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    if len(stops) > MAX_STOP_SEQUENCES:
        message = f"{len(stops)} stop sequences; send at most {MAX_STOP_SEQUENCES}, as OpenAI allows"
        raise APIError(400, message, "stop", "invalid_request")
    for stop in stops:
        if len(stop) > MAX_STOP_CHARS:
            raise APIError(
                400,
                f"a stop sequence is {len(stop):,} characters; the limit is {MAX_STOP_CHARS}",
                "stop",
                "invalid_request",
            )
    chars = images = 0
    for i, message in enumerate(request.messages):
        for name in MESSAGE_NOT_IMPLEMENTED:
            if not _unset((message.model_extra or {}).get(name)):
                raise APIError(
                    400, f"messages[{i}].{name}: tool calling is not supported by this server", f"messages[{i}].{name}"
                )
        unknown = sorted(set(message.model_extra or {}) - set(MESSAGE_NOT_IMPLEMENTED))
        if unknown:
            raise APIError(
                400, f"messages[{i}]: unrecognized field {unknown[0]!r}; remove it", f"messages[{i}].{unknown[0]}"
            )
        if isinstance(message.content, str):
            chars += len(message.content)
        for part in message.content if isinstance(message.content, list) else []:
            chars += len(part.text or "")
            images += part.type == "image_url"
    if chars > MAX_TEXT_CHARS:
        message = f"the messages hold {chars:,} characters; the limit is {MAX_TEXT_CHARS:,}: shorten them"
        raise APIError(400, message, "messages", "context_length_exceeded")
    if images > MAX_IMAGE_PARTS:
        message = f"the messages hold {images} images; the limit is {MAX_IMAGE_PARTS}: send fewer"
        raise APIError(400, message, "messages", "too_many_images")


def check_response_format(fmt: ResponseFormat | None) -> None:
    if fmt is None:
        return
    if fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema_ is None):
        message = (
            "response_format.json_schema.schema is required with type json_schema: send "
            '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}, or use type json_object'
        )
        raise APIError(400, message, "response_format.json_schema", "invalid_request")
    if fmt.type != "json_schema" and fmt.json_schema is not None:
        message = f"response_format.json_schema is only read with type json_schema, not {fmt.type!r}; remove it"
        raise APIError(400, message, "response_format.json_schema", "invalid_request")


def parse_request(body: bytes) -> ChatRequest:
    """The request body -> a checked ChatRequest, or an APIError naming the first problem.

    Run in a worker thread by the API: parsing a body near the size limit takes a noticeable moment, which
    must not be spent on the event loop that every other client shares."""
    try:
        # The standard library's parser, not pydantic's: it keeps lone surrogates (JSON allows "\ud800"), so
        # the processor can name the message and part that holds one.
        request = ChatRequest.model_validate(json.loads(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON ({e})", None, "invalid_request") from None
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param or 'request'}: {first['msg']}", param, "invalid_request") from None
    check_parameters(request)
    return request


def image_source(url: str, allowed_dir: Path | None, param: str) -> bytes | str:
    """An image_url -> bytes (data: URI) or a path inside `allowed_dir`; anything else is a 400."""
    if url.startswith("data:"):
        header, comma, data = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise APIError(
                400, "a data: URI image must be base64: data:image/png;base64,<data>", param, "invalid_image"
            )
        try:
            raw = base64.b64decode("".join(data.split()), validate=True)
        except binascii.Error as e:
            raise APIError(400, f"the image's base64 data is malformed ({e})", param, "invalid_image") from e
        if len(raw) > MAX_IMAGE_BYTES:
            raise APIError(
                400, f"image is {len(raw):,} bytes; the limit is {MAX_IMAGE_BYTES:,}", param, "invalid_image"
            )
        return raw
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        raise APIError(
            400,
            "remote image URLs are not fetched: this server makes no outbound requests. "
            "Send the image inline as a base64 data: URI (data:image/png;base64,...)",
            param,
            "invalid_image_url",
        )
    if scheme not in ("", "file"):
        raise APIError(
            400, f"unsupported image URL scheme {scheme!r}; use a base64 data: URI", param, "invalid_image_url"
        )
    if allowed_dir is None:
        raise APIError(
            400,
            "local image paths are disabled; send a base64 data: URI, or start the server with "
            "--allowed-image-dir DIR to allow files under DIR",
            param,
            "invalid_image_url",
        )
    local = unquote(urlsplit(url).path) if scheme == "file" else url
    if "\x00" in local:
        raise APIError(400, "an image path must not contain a NUL byte; check the path", param, "invalid_image_url")
    path = (allowed_dir / local).resolve()
    if not path.is_relative_to(allowed_dir):
        raise APIError(
            400, f"image path {url!r} is outside the allowed image directory {allowed_dir}", param, "invalid_image_url"
        )
    return str(path)


def to_messages(request: ChatRequest, allowed_dir: Path | None) -> list[dict]:
    """OpenAI messages -> mllm's (image_url parts become image parts holding bytes or a path)."""
    out = []
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        if not isinstance(message.content, list):
            out.append({"role": role, "content": message.content or ""})
            continue
        parts = []
        for j, part in enumerate(message.content):
            param = f"messages[{i}].content[{j}]"
            if part.type not in SUPPORTED_PARTS:
                raise APIError(
                    400,
                    f"messages[{i}].content[{j}]: content part type {part.type!r} is not supported; "
                    "send text and image_url parts",
                    param,
                    "unsupported_content_part",
                )
            if part.type == "text":
                parts.append({"type": "text", "text": part.text or ""})
            elif role != "user":
                raise APIError(400, f"images are accepted in user messages only, not {role}", param)
            else:
                url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
                if not url:
                    raise APIError(400, "an image_url part needs image_url.url", param, "invalid_image_url")
                parts.append({"type": "image", "image": image_source(url, allowed_dir, param)})
        out.append({"role": role, "content": parts})
    return out


def response_grammar(fmt: ResponseFormat | None, json_grammar) -> Grammar | None:
    """`response_format` -> the grammar the reply is held to (None for free text); `json_grammar(schema, strict)`
    compiles one for the served model (`ChatEngine.json_grammar`). A schema that cannot be used is a 400 naming
    the problem."""
    if fmt is None or fmt.type == "text":
        return None
    schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
    strict = bool(fmt.json_schema.strict) if fmt.type == "json_schema" else True
    try:
        return json_grammar(schema, strict)
    except GrammarError as e:
        raise APIError(
            400, f"response_format.json_schema.schema: {e}", "response_format.json_schema.schema", e.code
        ) from e


def gen_configs(
    request: ChatRequest, default: GenerationConfig, grammar: Grammar | None = None
) -> list[GenerationConfig]:
    """One config per choice (`n`): choice k samples with `seed + k` (reproducible, and the choices differ), and
    records its own log probabilities when asked."""
    gen = gen_config(request, default, grammar)
    return [
        replace(
            gen,
            seed=None if gen.seed is None else gen.seed + k,
            logprobs=LogprobRecord(request.top_logprobs or 0) if request.logprobs else None,
        )
        for k in range(request.n)
    ]


def gen_config(request: ChatRequest, default: GenerationConfig, grammar: Grammar | None = None) -> GenerationConfig:
    max_tokens = request.max_completion_tokens or request.max_tokens or default.max_new_tokens
    temperature = default.temperature if request.temperature is None else request.temperature
    top_p = default.top_p if request.top_p is None else request.top_p
    return GenerationConfig(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=request.seed,
        ignore_eos=request.ignore_eos,
        constraint=grammar,
    )
