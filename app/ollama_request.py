"""The Ollama API's request side: `/api/chat` and `/api/generate` bodies -> mllm's messages and GenerationConfig.

Ollama's `options` map onto our sampling settings (temperature, top_p, top_k, seed, num_predict, stop,
repeat_penalty); its load-time settings (num_ctx, num_gpu, num_thread, ...) are accepted without effect, since
this server fixes them at start; sampling options we do not implement are refused by name unless neutral, and an
unknown option is refused, as on the OpenAI routes. Every problem is an APIError the app writes as Ollama's
`{"error": "..."}`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.api_request import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PARTS,
    MAX_MESSAGES,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_TEXT_CHARS,
    MAX_TOKENS,
    APIError,
)
from mllm.constrained import Grammar
from mllm.errors import GrammarError
from mllm.generation import GenerationConfig

# Ollama's load-time settings: this server loads its model once at start, so they change nothing.
NO_EFFECT_OPTIONS = frozenset(
    "numa num_ctx num_batch num_gpu main_gpu low_vram f16_kv logits_all vocab_only use_mmap use_mlock "
    "embedding_only num_thread num_keep".split()
)
# Sampling options this server does not implement: accepted only at their neutral value.
NEUTRAL_OPTIONS: dict[str, tuple] = {
    "min_p": (lambda v: v == 0, "min_p is not supported; leave it out or send 0"),
    "typical_p": (lambda v: v == 1, "typical_p is not supported; leave it out or send 1"),
    "tfs_z": (lambda v: v == 1, "tfs_z is not supported; leave it out or send 1"),
    "repeat_last_n": (
        lambda v: v == -1,
        "repeat_penalty here covers the whole conversation; send repeat_last_n -1 or leave it out",
    ),
    "presence_penalty": (lambda v: v == 0, "presence_penalty is not supported; leave it out or send 0"),
    "frequency_penalty": (lambda v: v == 0, "frequency_penalty is not supported; leave it out or send 0"),
    "mirostat": (lambda v: v == 0, "mirostat sampling is not supported; leave it out or send 0"),
    "mirostat_tau": (lambda v: True, ""),  # read only by mirostat, which is off
    "mirostat_eta": (lambda v: True, ""),
    "penalize_newline": (lambda v: not v, "penalize_newline is not supported; leave it out or send false"),
}
HONOURED_OPTIONS = ("temperature", "top_p", "top_k", "seed", "num_predict", "stop", "repeat_penalty")
# Go's duration syntax ("5m", "1h30m", "-1s") or a number of seconds.
DURATION = re.compile(r"-?(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+|-?\d+(\.\d+)?")


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    thinking: str | None = None
    """Sent back by clients in an assistant message's history; this model does not think, it is not read."""
    tool_calls: list | None = None
    tool_name: str | None = None


class OllamaBody(BaseModel):
    """What `/api/chat` and `/api/generate` share."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    stream: bool = True
    format: Literal["", "json"] | dict | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None
    """Accepted: the model stays loaded for the server's life whatever is asked."""
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class ChatBody(OllamaBody):
    messages: list[OllamaMessage] = Field(default_factory=list, max_length=MAX_MESSAGES)
    tools: list | None = None


class GenerateBody(OllamaBody):
    prompt: str | None = None
    system: str | None = None
    images: list[str] | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None


def parse(body: bytes, kind: type[OllamaBody]) -> OllamaBody:
    try:
        request = kind.model_validate(json.loads(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON ({e})") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "request"
        hint = "; remove it" if first["type"] == "extra_forbidden" else ""
        raise APIError(400, f"{where}: {first['msg']}{hint}") from None
    check(request)
    return request


def check(request: OllamaBody) -> None:
    """Refuse by name what this server would otherwise ignore."""
    if request.think not in (None, False):
        raise APIError(400, "think: this model does not think in steps; leave think out or send false")
    if request.logprobs or request.top_logprobs:
        raise APIError(400, "logprobs: log probabilities are not returned on the Ollama routes; leave them out")
    if isinstance(request.keep_alive, str) and not DURATION.fullmatch(request.keep_alive):
        raise APIError(400, f'keep_alive: {request.keep_alive!r} is not a duration; send e.g. "5m", "1h" or -1')
    if isinstance(request, ChatBody):
        if request.tools:
            raise APIError(400, "tools: tool calling is not supported by this server; leave tools out")
        for i, message in enumerate(request.messages):
            if message.role == "tool" or message.tool_calls or message.tool_name:
                raise APIError(400, f"messages[{i}]: tool calling is not supported by this server")
            if message.images and message.role != "user":
                raise APIError(400, f"messages[{i}].images: images are accepted in user messages only")
    else:
        for name in ("suffix", "template", "context"):
            if getattr(request, name):
                raise APIError(400, f"{name}: not supported by this server (it applies the model's own template)")
        if request.raw:
            raise APIError(400, "raw: raw prompts are not supported; the model's chat template is always applied")
    images = [i for m in getattr(request, "messages", []) for i in m.images or []] + (
        getattr(request, "images", None) or []
    )
    if len(images) > MAX_IMAGE_PARTS:
        raise APIError(400, f"the request holds {len(images)} images; the limit is {MAX_IMAGE_PARTS}: send fewer")
    texts = [m.content for m in getattr(request, "messages", [])] + [
        getattr(request, name, None) or "" for name in ("prompt", "system")
    ]
    if sum(map(len, texts)) > MAX_TEXT_CHARS:
        raise APIError(400, f"the request holds over {MAX_TEXT_CHARS:,} characters of text: shorten it")


def decode_image(data: str, where: str) -> bytes:
    """An Ollama image: base64 without a `data:` header (one is tolerated)."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except binascii.Error as e:
        raise APIError(
            400, f"{where}: the image is not valid base64 ({e}); send the file's bytes base64-encoded"
        ) from e
    if len(raw) > MAX_IMAGE_BYTES:
        raise APIError(400, f"{where}: the image is {len(raw):,} bytes; the limit is {MAX_IMAGE_BYTES:,}")
    return raw


def _content(text: str, images: list[str] | None, where: str) -> list[dict] | str:
    if not images:
        return text
    parts = [{"type": "image", "image": decode_image(b64, f"{where}[{k}]")} for k, b64 in enumerate(images)]
    return parts + [{"type": "text", "text": text}]


def to_messages(request: OllamaBody) -> list[dict]:
    """The request's conversation in mllm's format (images before the text of their message); empty for a
    request that only loads the model (no messages, or no prompt and no images)."""
    if isinstance(request, ChatBody):
        return [
            {"role": m.role, "content": _content(m.content, m.images, f"messages[{i}].images")}
            for i, m in enumerate(request.messages)
        ]
    if not request.prompt and not request.images:
        return []
    messages = [{"role": "system", "content": request.system}] if request.system else []
    return messages + [{"role": "user", "content": _content(request.prompt or "", request.images, "images")}]


def stops(request: OllamaBody) -> list[str]:
    stop = (request.options or {}).get("stop") or []
    return [stop] if isinstance(stop, str) else list(stop)


def grammar(request: OllamaBody, json_grammar) -> Grammar | None:
    """`format`: "json" (any JSON object) or a JSON schema (keywords the grammar cannot enforce are ignored, as
    Ollama ignores them)."""
    if not request.format:
        return None
    try:
        return json_grammar(None if request.format == "json" else request.format, False)
    except GrammarError as e:
        raise APIError(400, f"format: {e}") from e


def gen_config(request: OllamaBody, default: GenerationConfig, constraint: Grammar | None) -> GenerationConfig:
    """`options` -> our sampling settings, each refused by name when out of range or not implemented."""
    options = dict(request.options or {})
    for name, value in options.items():
        if name in HONOURED_OPTIONS or name in NO_EFFECT_OPTIONS:
            continue
        if name not in NEUTRAL_OPTIONS:
            raise APIError(400, f"options.{name}: unknown option; remove it")
        is_neutral, why = NEUTRAL_OPTIONS[name]
        if not is_neutral(value):
            raise APIError(400, f"options.{name}: {why}")
    stop_list = stops(request)
    if len(stop_list) > MAX_STOP_SEQUENCES or any(not isinstance(s, str) or len(s) > MAX_STOP_CHARS for s in stop_list):
        raise APIError(
            400, f"options.stop: send at most {MAX_STOP_SEQUENCES} strings of at most {MAX_STOP_CHARS} characters"
        )
    seed = options.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise APIError(400, f"options.seed: {seed!r} is not an integer")
    predict = options.get("num_predict")
    if predict is None:
        max_tokens = default.max_new_tokens
    elif predict in (-1, -2):  # Ollama: no limit / fill the context; a reply always stops at the context
        max_tokens = MAX_TOKENS
    elif isinstance(predict, int) and 1 <= predict <= MAX_TOKENS:
        max_tokens = predict
    else:
        raise APIError(400, f"options.num_predict: {predict!r}; send a token count from 1, or -1 for no limit")
    try:
        return GenerationConfig(
            max_new_tokens=max_tokens,
            temperature=float(options.get("temperature", default.temperature)),
            top_p=float(options.get("top_p", default.top_p)),
            top_k=int(options.get("top_k", default.top_k)),
            repetition_penalty=float(options.get("repeat_penalty", default.repetition_penalty)),
            seed=seed,
            constraint=constraint,
        )
    except (TypeError, ValueError) as e:
        raise APIError(400, f"options: {e}") from e
