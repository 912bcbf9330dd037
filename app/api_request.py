"""The API's request side: OpenAI's chat request schema, its messages and images -> mllm's, and error shapes.

Everything here turns a client's mistake into an APIError (status, message, param, code) before the
engine sees the request; `error_response` writes any error in OpenAI's JSON shape
`{"error": {"message", "type", "param", "code"}}`. Images: base64 `data:` URIs, or local paths /
`file://` URLs inside the server's allowed image directory; remote http(s) URLs are refused (see app.api).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mllm.generation import GenerationConfig

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


SUPPORTED_PARTS = ("text", "image_url")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    """Any OpenAI part type parses; `to_messages` refuses those other than SUPPORTED_PARTS by name."""
    text: str | None = None
    image_url: ImageURL | str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we have no use for (user, logprobs, ...)
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    # vLLM's extra sampling parameter (OpenAI clients send it in extra_body): the reply runs to max_tokens
    # whatever the model writes, so load benchmarks compare equal lengths.
    ignore_eos: bool = False


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
    path = (allowed_dir / (unquote(urlsplit(url).path) if scheme == "file" else url)).resolve()
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


def gen_config(request: ChatRequest, default: GenerationConfig) -> GenerationConfig:
    max_tokens = request.max_completion_tokens or request.max_tokens or default.max_new_tokens
    temperature = default.temperature if request.temperature is None else request.temperature
    top_p = default.top_p if request.top_p is None else request.top_p
    return GenerationConfig(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=request.seed,
        ignore_eos=request.ignore_eos,
    )
