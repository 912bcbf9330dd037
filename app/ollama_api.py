"""Ollama-compatible routes on the same server and engine as the OpenAI ones: tools that speak only Ollama's API
(`/api/chat`, `/api/generate`, `/api/tags`, `/api/show`, `/api/ps`, `/api/version`) use `mllm api` in its place.

Replies stream as newline-delimited JSON objects, one per text piece and a last one with `done: true`, the
reason and the counts and durations (nanoseconds), as Ollama writes them; `stream: false` gives the last one with
the whole text. Images are base64 strings in a message's (or the request's) `images`; `format` is "json" or a JSON
schema (`mllm.constrained`); `options` are mapped by app.ollama_request. The key check and the body limit are the
OpenAI routes' middlewares; errors are Ollama's `{"error": "..."}` (app.api writes them by path).
"""

from __future__ import annotations

import json
import time
from contextlib import aclosing
from datetime import datetime, timezone
from functools import partial

import anyio
from fastapi import APIRouter, Request

import app.ollama_request as req
from app.api_request import APIError
from app.api_stream import CancellingStreamingResponse, Completion
from app.engine import ChatEngine

# The Ollama release whose API these routes follow (clients that check the server's version read it).
OLLAMA_VERSION = "0.12.0"


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _size(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


class _Timed:
    """One reply's durations as Ollama reports them (nanoseconds): the prompt until the first piece, then the rest."""

    def __init__(self):
        self.start = self.first = time.perf_counter_ns()
        self.seen = False

    def piece(self) -> None:
        if not self.seen:
            self.first, self.seen = time.perf_counter_ns(), True

    def summary(self, completion: Completion) -> dict:
        end = time.perf_counter_ns()
        first = self.first if self.seen else end
        return {
            "done": True,
            "done_reason": completion.finish_reason,
            "total_duration": end - self.start,
            "load_duration": 0,
            "prompt_eval_count": completion.stream.prompt_tokens,
            "prompt_eval_duration": first - self.start,
            "eval_count": completion.stream.completion_tokens,
            "eval_duration": end - first,
        }


def ollama_router(engine: ChatEngine, limiter: anyio.CapacityLimiter, started: float, on_done=None) -> APIRouter:
    """The /api/ routes; `on_done` is told of each reply's timing (`app.api_stream.Completion`)."""
    api = APIRouter(prefix="/api")
    names = {engine.model_id, f"{engine.model_id}:latest", engine.name}
    modified = datetime.fromtimestamp(started, timezone.utc).isoformat().replace("+00:00", "Z")

    def check_model(name: str) -> None:
        if name not in names:
            raise APIError(404, f"model {name!r} not found; this server serves {engine.model_id!r}")

    def details() -> dict:
        info = engine.info()
        return {
            "parent_model": "",
            "format": info["backend"],
            "family": "llama",
            "families": ["llama", info["vision"].split(" ")[0]],
            "parameter_size": _size(info["parameters"]),
            "quantization_level": str(info["quantization"]),
        }

    def card() -> dict:
        info = engine.info()
        return {
            "name": f"{engine.model_id}:latest",
            "model": f"{engine.model_id}:latest",
            "modified_at": modified,
            "size": info["weights_bytes"],
            "digest": "",
            "details": details(),
        }

    @api.get("/version")
    def version() -> dict:
        return {"version": OLLAMA_VERSION}

    @api.get("/tags")
    def tags() -> dict:
        return {"models": [card()]}

    @api.get("/ps")
    def ps() -> dict:
        running = {**card(), "expires_at": "2318-01-01T00:00:00Z", "size_vram": 0}
        return {"models": [{**running, "context_length": engine.info()["context_length"]}]}

    @api.post("/show")
    async def show(http: Request) -> dict:
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})") from None
        name = body.get("model") or body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise APIError(400, 'model: required; send {"model": "<name>"}')
        check_model(name)
        info = engine.info()
        return {
            "modelfile": f"# served by mllm\nFROM {engine.name}\n",
            "parameters": "",
            "template": "",
            "details": details(),
            "model_info": {
                "general.architecture": "llama",
                "general.parameter_count": info["parameters"],
                "llama.context_length": info["context_length"],
                "mllm.tokens_per_image": info["tokens_per_image"],
                "mllm.max_images": info["max_images"],
            },
            "capabilities": ["completion", "vision"],
            "modified_at": modified,
        }

    async def reply(http: Request, kind: type[req.OllamaBody]):
        timed, arrived = _Timed(), time.perf_counter()
        request = await anyio.to_thread.run_sync(req.parse, await http.body(), kind)
        check_model(request.model)
        chat = kind is req.ChatBody

        def frame(text: str) -> dict:
            body = {"model": request.model, "created_at": now()}
            return {**body, "message": {"role": "assistant", "content": text}} if chat else {**body, "response": text}

        messages = await anyio.to_thread.run_sync(req.to_messages, request)
        if not messages:  # Ollama's way to load (or, with keep_alive 0, unload) a model: nothing to answer
            reason = "unload" if request.keep_alive in (0, "0") else "load"
            return {**frame(""), "done": True, "done_reason": reason}
        constraint = await anyio.to_thread.run_sync(req.grammar, request, engine.json_grammar)
        gen = req.gen_config(request, engine.gen, constraint)
        stream = await anyio.to_thread.run_sync(partial(engine.complete, messages, gen), limiter=limiter)
        completion = Completion(stream, limiter, req.stops(request), on_done, arrived)
        if not request.stream:
            text = await completion.collect(http)
            timed.piece()
            return {**frame(text), **timed.summary(completion)}

        async def lines():
            try:
                async with aclosing(completion.pieces()) as pieces:
                    async for text in pieces:
                        timed.piece()
                        yield json.dumps({**frame(text), "done": False}) + "\n"
            except Exception as e:  # headers are sent: report in the stream, as Ollama does
                yield json.dumps({"error": str(e)}) + "\n"
                return
            yield json.dumps({**frame(""), **timed.summary(completion)}) + "\n"

        return CancellingStreamingResponse(lines(), completion.cancel, media_type="application/x-ndjson")

    @api.post("/chat")
    async def chat(http: Request):
        return await reply(http, req.ChatBody)

    @api.post("/generate")
    async def generate(http: Request):
        return await reply(http, req.GenerateBody)

    return api
