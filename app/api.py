"""OpenAI-compatible HTTP API over ChatEngine: `POST /v1/chat/completions` (SSE streaming), `GET /v1/models`.

Images come as base64 `data:` URIs, or as local paths / `file://` URLs inside `--allowed-image-dir`.
Remote http(s) URLs are refused: fetching them would make this server reach wherever a client
points it (an SSRF hole) and hide slow downloads inside a request. Errors use OpenAI's JSON shape
`{"error": {"message", "type", "param", "code"}}`, so OpenAI client libraries raise their usual exceptions.

    mllm api [--model M] [--host 127.0.0.1] [--port 8000] [--api-key K] [--allowed-image-dir DIR]
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import aclosing, contextmanager
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from app import Parser, UsageError, add_model_args, load_engine, run
from app.engine import ChatEngine, ChatError, Stream
from mllm.generation import GenerationConfig

MAX_IMAGE_BYTES = 20 * 1024 * 1024


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"  # OpenAI sends this type for 401 too
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class ImageURL(BaseModel):
    url: str


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url"]
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
    return GenerationConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=request.seed)


class StopMatcher:
    """Cuts the text before the first stop string; holds back a tail that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops, self.buffer = [s for s in stops if s], ""

    def push(self, piece: str) -> tuple[str, bool]:
        self.buffer += piece
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0)
        cut = len(self.buffer) - hold
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


class Completion:
    """One request's reply, read from the engine's Stream in worker threads (each next() may wait its turn)."""

    def __init__(self, stream: Stream, request: ChatRequest, model_id: str, limiter: anyio.CapacityLimiter):
        self.stream, self.request, self.model_id, self.limiter = stream, request, model_id, limiter
        stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
        self.matcher = StopMatcher(stops)
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.finish_reason = "stop"

    async def pieces(self):
        try:
            while (piece := await anyio.to_thread.run_sync(next, self.stream, None, limiter=self.limiter)) is not None:
                text, hit = self.matcher.push(piece)
                if text:
                    yield text
                if hit:  # a stop string: stop generating too, not just sending
                    return
            if tail := self.matcher.flush():
                yield tail
            self.finish_reason = "length" if self.stream.finish_reason == "length" else "stop"
        finally:
            self.stream.cancel.set()
            self.stream.close()

    def usage(self) -> dict:
        prompt, completion = self.stream.prompt_tokens, self.stream.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _chunk(self, choices: list, **extra) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_id}
        return f"data: {json.dumps({**body, 'choices': choices, **extra})}\n\n"

    async def sse(self):
        def delta(d: dict, finish: str | None = None) -> list:
            return [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]

        yield self._chunk(delta({"role": "assistant", "content": ""}))
        try:
            async with aclosing(self.pieces()) as pieces:  # closed at once when the client goes away
                async for text in pieces:
                    yield self._chunk(delta({"content": text}))
        except Exception as e:  # headers are sent: report in the stream, as OpenAI does
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
            return
        yield self._chunk(delta({}, self.finish_reason))
        if self.request.stream_options is not None and self.request.stream_options.include_usage:
            yield self._chunk([], usage=self.usage())
        yield "data: [DONE]\n\n"

    async def response(self, http: Request) -> dict:
        text = ""
        async with aclosing(self.pieces()) as pieces:
            async for piece in pieces:
                text += piece
                if await http.is_disconnected():  # nobody is waiting for the answer any more
                    break
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model_id,
            "choices": [choice],
            "usage": self.usage(),
        }


def create_app(engine: ChatEngine, api_key: str | None = None, allowed_image_dir: str | Path | None = None) -> FastAPI:
    allowed_dir = Path(allowed_image_dir).resolve() if allowed_image_dir is not None else None
    # Threads that wait on the engine (queued or generating) get their own pool, so a full queue
    # never starves the default pool that serves everything else.
    limiter = anyio.CapacityLimiter(engine.max_concurrency + engine.max_queue + 2)
    created = int(time.time())

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'", None, "invalid_api_key")

    app = FastAPI(title="mllm", docs_url=None, redoc_url=None)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])
    card = {"id": engine.model_id, "object": "model", "created": created, "owned_by": "mllm"}

    @v1.get("/models")
    def list_models() -> dict:
        return {"object": "list", "data": [card]}

    @v1.get("/models/{model_id:path}")
    def get_model(model_id: str) -> dict:
        if model_id != engine.model_id:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {engine.model_id!r}")
        return {**card, "info": engine.info()}

    @v1.post("/chat/completions")
    async def chat_completions(request: ChatRequest, http: Request):
        if request.model not in (engine.model_id, engine.name):
            message = f"the model {request.model!r} does not exist; this server serves {engine.model_id!r}"
            raise APIError(404, message, "model", "model_not_found")
        if request.n != 1:
            raise APIError(400, f"n={request.n}: this server returns one choice per request; use n=1", "n")
        messages = to_messages(request, allowed_dir)
        try:
            gen = gen_config(request, engine.gen)
        except ValueError as e:
            raise APIError(400, str(e)) from e
        # complete() checks the request (images, length, queue) before anything streams.
        stream = await anyio.to_thread.run_sync(engine.complete, messages, gen, limiter=limiter)
        completion = Completion(stream, request, engine.model_id, limiter)
        if request.stream:
            return StreamingResponse(completion.sse(), media_type="text/event-stream")
        return await completion.response(http)

    app.include_router(v1)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", **{k: v for k, v in engine.info().items() if k in ("running", "waiting")}}

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return _error(e.status, e.message, e.param, e.code)

    @app.exception_handler(ChatError)
    async def chat_error(_, e: ChatError):
        if e.code == "overloaded":
            return _error(503, str(e), None, e.code, headers={"Retry-After": "1"})
        return _error(400, str(e), "messages", e.code)

    @app.exception_handler(RequestValidationError)
    async def schema_error(_, e: RequestValidationError):
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return _error(400, f"{param or 'request'}: {first['msg']}", param, "invalid_request")

    @app.exception_handler(Exception)
    async def server_error(_, e: Exception):
        return _error(500, f"internal error ({type(e).__name__}: {e}); see the server log")

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return _error(e.status_code, str(e.detail), None, None)

    return app


def _main(argv: list[str]) -> int:
    import uvicorn

    p = Parser(prog="mllm api", description="Serve the model over an OpenAI-compatible HTTP API.")
    add_model_args(p, port=8000)
    p.add_argument("--api-key", default=os.environ.get("MLLM_API_KEY"), help="require this bearer token")
    p.add_argument("--allowed-image-dir", default=None, help="let requests name image files under this folder")
    p.add_argument("--max-concurrency", type=int, default=4, help="replies generated at once (they take turns)")
    p.add_argument("--max-queue", type=int, default=32, help="requests that may wait; more get 503")
    args = p.parse_args(argv)
    if args.allowed_image_dir is not None and not Path(args.allowed_image_dir).is_dir():
        raise UsageError(f"mllm api: --allowed-image-dir {args.allowed_image_dir} is not a directory")
    if args.max_concurrency < 1 or args.max_queue < 0:
        raise UsageError("mllm api: need --max-concurrency >= 1 and --max-queue >= 0")
    engine = load_engine(args, max_concurrency=args.max_concurrency, max_queue=args.max_queue)
    app = create_app(engine, api_key=args.api_key, allowed_image_dir=args.allowed_image_dir)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"mllm api: warning: listening on {args.host} without --api-key; anyone who can reach it can use it")
    print(f"mllm api: serving {engine.model_id!r} at http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv)


@contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread (tests, benchmarks); yields its base URL.

    Port 0 takes a free port: the socket is bound here, so the URL is known before the server starts.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start; see the log above")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
