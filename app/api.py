"""OpenAI-compatible HTTP API over ChatEngine: `POST /v1/chat/completions` (SSE streaming), `GET /v1/models`; the
Ollama-compatible routes under /api/ (app.ollama_api) on the same engine, behind the same key check and body limit.

Images come as base64 `data:` URIs, or as local paths / `file://` URLs inside `--allowed-image-dir`.
Remote http(s) URLs are refused: fetching them would make this server reach wherever a client
points it (an SSRF hole) and hide slow downloads inside a request. Errors use OpenAI's JSON shape
`{"error": {"message", "type", "param", "code"}}`, so OpenAI client libraries raise their usual exceptions.
Request parsing and error shapes are in app.api_request, the reply (SSE or JSON) in app.api_stream; the
`mllm api` command (app.cli) serves `create_app(engine)` with uvicorn.
"""

from __future__ import annotations

import hmac
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from app.api_request import APIError, error_response, gen_configs, parse_request, response_grammar, to_messages
from app.api_stream import CancellingStreamingResponse, ChatReply, Completion
from app.engine import ChatEngine
from app.metrics import Metrics, RequestCounter
from app.ollama_api import ollama_router
from app.scheduling import ChatError

MAX_BODY_BYTES = 64 * 2**20  # a request with a few large base64 images fits; a runaway one does not
# What /health reports: the load (running, waiting, recent tokens/s) and the caches (hits, MiB held).
HEALTH_FIELDS = (
    "running",
    "waiting",
    "generated_tokens",
    "tokens_per_s",
    "prefix_cache_entries",
    "prefix_cache_mib",
    "prefix_cache_budget_mib",
    "prefix_cache_hits",
    "prefix_cache_misses",
    "prefix_cache_reused_tokens",
    "feature_cache_images",
    "feature_cache_hits",
    "feature_cache_misses",
)


# The routes counted by name in /metrics (any other path is counted as "other").
ROUTES = (
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/metrics",
    "/api/chat",
    "/api/generate",
    "/api/tags",
    "/api/show",
    "/api/ps",
    "/api/version",
)


def create_app(
    engine: ChatEngine,
    api_key: str | None = None,
    allowed_image_dir: str | Path | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    cors_origins: tuple[str, ...] | list[str] = (),
) -> FastAPI:
    """The server's app. `cors_origins`: the browser origins (`https://app.example`) whose pages may call it; none
    by default, so a web page a user visits cannot make their browser talk to a local server."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty; pass a non-empty key, or none to serve without one")
    allowed_dir = Path(allowed_image_dir).resolve() if allowed_image_dir is not None else None
    # Threads that wait on the engine (queued or generating) get their own pool, so a full queue
    # never starves the default pool that serves everything else.
    limiter = anyio.CapacityLimiter(engine.max_concurrency + engine.max_queue + 2)
    created = int(time.time())

    app = FastAPI(title="mllm", docs_url=None, redoc_url=None)
    metrics = Metrics(engine, ROUTES)
    # The last middleware added runs first: the key is checked before a byte of the body is read, and CORS answers
    # a browser's preflight (which carries no key) before the key check, adding its headers to every reply.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(APIKeyAuth, api_key=api_key, open_paths=("/health",))
    app.add_middleware(RequestCounter, metrics=metrics)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    v1 = APIRouter(prefix="/v1")
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
    async def chat_completions(http: Request):
        arrived = time.perf_counter()
        # Parsed and checked off the event loop: a body near the size limit takes a while to parse.
        request = await anyio.to_thread.run_sync(parse_request, await http.body())
        if request.model not in (engine.model_id, engine.name):
            message = f"the model {request.model!r} does not exist; this server serves {engine.model_id!r}"
            raise APIError(404, message, "model", "model_not_found")
        messages = to_messages(request, allowed_dir)
        # Off the event loop: the first grammar builds the tokenizer's index (~1 s), a large schema compiles a while.
        grammar = await anyio.to_thread.run_sync(response_grammar, request.response_format, engine.json_grammar)
        try:
            gens = gen_configs(request, engine.gen, grammar)
        except ValueError as e:
            raise APIError(400, str(e)) from e
        if request.n > engine.max_concurrency:
            message = f"n={request.n}: this server decodes at most {engine.max_concurrency} replies at once; lower n"
            raise APIError(400, message, "n", "invalid_request")
        # complete_many() checks the request (images, length, queue) before anything streams.
        exact = (request.max_completion_tokens or request.max_tokens) is not None
        complete = partial(engine.complete_many, messages, gens, exact_max_tokens=exact)
        streams = await anyio.to_thread.run_sync(complete, limiter=limiter)
        stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
        decode = engine.model.processor.decode
        choices = [
            Completion(s, limiter, stops, metrics.reply_done, arrived, logprobs=g.logprobs, decode=decode)
            for s, g in zip(streams, gens, strict=True)
        ]
        reply = ChatReply(choices, request, engine.model_id)
        if request.stream:
            return CancellingStreamingResponse(reply.sse(), reply.cancel, media_type="text/event-stream")
        return await reply.response(http)

    app.include_router(v1)

    @app.get("/health")
    def health(http: Request) -> dict:
        # Without the key, only whether the server is up: cache hit counts would tell an outsider whether
        # someone recently sent a given image or prompt.
        if api_key is not None and not key_matches(http.headers, api_key):
            return {"status": "ok"}
        return {"status": "ok", **{k: v for k, v in engine.info().items() if k in HEALTH_FIELDS}}

    app.include_router(ollama_router(engine, limiter, created, on_done=metrics.reply_done))

    @app.get("/metrics")
    def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.exception_handler(APIError)
    async def api_error(http: Request, e: APIError):
        return shaped_error(http.url.path, e.status, e.message, e.param, e.code)

    @app.exception_handler(ChatError)
    async def chat_error(http: Request, e: ChatError):
        if e.code == "overloaded":
            return shaped_error(http.url.path, 503, str(e), None, e.code, headers={"Retry-After": "1"})
        return shaped_error(http.url.path, 400, str(e), "messages", e.code)

    @app.exception_handler(RequestValidationError)
    async def schema_error(http: Request, e: RequestValidationError):
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return shaped_error(http.url.path, 400, f"{param or 'request'}: {first['msg']}", param, "invalid_request")

    @app.exception_handler(Exception)
    async def server_error(http: Request, e: Exception):
        return shaped_error(http.url.path, 500, f"internal error ({type(e).__name__}: {e}); see the server log")

    @app.exception_handler(HTTPException)
    async def http_error(http: Request, e: HTTPException):
        return shaped_error(http.url.path, e.status_code, str(e.detail), None, None)

    return app


def shaped_error(path: str, status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    """An error in the shape its route's clients read: Ollama's `{"error": "..."}` under /api/, OpenAI's elsewhere."""
    if path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return error_response(status, message, param, code, headers=headers)


def key_matches(headers, api_key: str) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class APIKeyAuth:
    """Refuse a request without the right `Authorization: Bearer <key>` with 401 before its body is read, so an
    unauthenticated client cannot make the server read, hold and parse a large body. `open_paths` answer
    anyone (each decides itself what an unauthenticated caller may see)."""

    def __init__(self, app, api_key: str, open_paths: tuple[str, ...] = ()):
        self.app, self.api_key, self.open_paths = app, api_key, open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        if not key_matches(Headers(scope=scope), self.api_key):
            message = "missing or wrong API key; send 'Authorization: Bearer <key>'"
            return await shaped_error(scope["path"], 401, message, None, "invalid_api_key")(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """Refuse a request body over `max_bytes` with 413, before the app parses it: from Content-Length when the
    client sends one, else by counting a chunked body as it arrives (it is then replayed to the app)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await self._refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size, more = size + len(chunks[-1]), message.get("more_body", False)
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
        replayed = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            # The body once, then the real channel: after the body a receive waits for the client to go away
            # (http.disconnect), which is what a streaming reply listens for.
            return replayed.pop() if replayed else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        mib = self.max_bytes / 2**20
        response = shaped_error(
            scope["path"],
            413,
            f"the request body is over {mib:g} MiB; send fewer or smaller images",
            None,
            "request_too_large",
        )
        await response(scope, receive, send)


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
