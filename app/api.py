"""OpenAI-compatible HTTP API over ChatEngine: `POST /v1/chat/completions` (SSE streaming), `GET /v1/models`.

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
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException

from app.api_request import APIError, ChatRequest, error_response, gen_config, to_messages
from app.api_stream import Completion
from app.engine import ChatEngine
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


def create_app(
    engine: ChatEngine,
    api_key: str | None = None,
    allowed_image_dir: str | Path | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
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
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
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
        exact = (request.max_completion_tokens or request.max_tokens) is not None
        complete = partial(engine.complete, messages, gen, exact_max_tokens=exact)
        stream = await anyio.to_thread.run_sync(complete, limiter=limiter)
        completion = Completion(stream, request, engine.model_id, limiter)
        if request.stream:
            return StreamingResponse(completion.sse(), media_type="text/event-stream")
        return await completion.response(http)

    app.include_router(v1)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", **{k: v for k, v in engine.info().items() if k in HEALTH_FIELDS}}

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(ChatError)
    async def chat_error(_, e: ChatError):
        if e.code == "overloaded":
            return error_response(503, str(e), None, e.code, headers={"Retry-After": "1"})
        return error_response(400, str(e), "messages", e.code)

    @app.exception_handler(RequestValidationError)
    async def schema_error(_, e: RequestValidationError):
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return error_response(400, f"{param or 'request'}: {first['msg']}", param, "invalid_request")

    @app.exception_handler(Exception)
    async def server_error(_, e: Exception):
        return error_response(500, f"internal error ({type(e).__name__}: {e}); see the server log")

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return error_response(e.status_code, str(e.detail), None, None)

    return app


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
        body = b"".join(chunks)

        async def replay():
            nonlocal body
            message, body = {"type": "http.request", "body": body, "more_body": False}, b""
            return message

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        mib = self.max_bytes / 2**20
        response = error_response(
            413, f"the request body is over {mib:g} MiB; send fewer or smaller images", None, "request_too_large"
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
