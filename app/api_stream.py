"""One chat completion's reply over HTTP: stop strings, SSE chunks (`stream=true`) or one JSON body.

The engine's Stream is a blocking iterator (each next() may wait its turn for the model), so it is
read in worker threads under the server's own limiter; the event loop never blocks on the model.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import aclosing

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from app.api_request import ChatRequest
from app.scheduling import Stream


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
        cut = len(self.buffer) - max((self._held(s) for s in self.stops), default=0)
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out, False

    def _held(self, stop: str) -> int:
        """The longest tail of the buffer that `stop` starts with (the API bounds a stop's length)."""
        for k in range(min(len(stop) - 1, len(self.buffer)), 0, -1):
            if self.buffer.endswith(stop[:k]):
                return k
        return 0

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


class Completion:
    """One request's reply, read from the engine's Stream in worker threads (each next() may wait its turn)."""

    def __init__(
        self,
        stream: Stream,
        request: ChatRequest | None,
        model_id: str,
        limiter: anyio.CapacityLimiter,
        stops: list[str] | None = None,
        on_done=None,
        started: float | None = None,
    ):
        """`request`: the OpenAI request (`sse` and `response` read it); the Ollama routes pass None and `stops`,
        and read `pieces` themselves. `on_done(started, first, tokens)` is told when the reply ends (app.metrics):
        `started` (the request's arrival; default: now) and its first text on `time.perf_counter`'s clock (first: None without text), its token count."""
        self.stream, self.request, self.model_id, self.limiter = stream, request, model_id, limiter
        if request is not None:
            stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
        self.matcher = StopMatcher(stops or [])
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.finish_reason = "stop"
        self.on_done, self.started, self.first = on_done, started or time.perf_counter(), None

    async def pieces(self):
        try:
            while (piece := await anyio.to_thread.run_sync(next, self.stream, None, limiter=self.limiter)) is not None:
                text, hit = self.matcher.push(piece)
                if text:
                    self.first = self.first or time.perf_counter()
                    yield text
                if hit:  # a stop string: stop generating too, not just sending
                    return
            if tail := self.matcher.flush():
                self.first = self.first or time.perf_counter()
                yield tail
            self.finish_reason = "length" if self.stream.finish_reason == "length" else "stop"
        finally:
            self.stream.stop()
            # Closing runs the reply's cleanup (the prefix cache keeps its KV): a worker thread's job, and it
            # must run even when this task is being cancelled (the client went away).
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.stream.close, limiter=self.limiter)
            if self.on_done is not None:
                self.on_done(self.started, self.first, self.stream.completion_tokens)

    def cancel(self) -> None:
        """The client went away: stop the reply wherever it is (waiting for a place, prefilling, decoding)."""
        self.stream.stop()

    async def _watch(self, http: Request) -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass
        self.cancel()

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

    async def collect(self, http: Request) -> str:
        """The whole reply's text (a non-streaming request), stopped if the client goes away meanwhile."""
        text = ""
        async with anyio.create_task_group() as group:
            group.start_soon(self._watch, http)  # the body is read: the next message is the client leaving
            async with aclosing(self.pieces()) as pieces:
                async for piece in pieces:
                    text += piece
            group.cancel_scope.cancel()
        return text

    async def response(self, http: Request) -> dict:
        text = await self.collect(http)
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


class CancellingStreamingResponse(StreamingResponse):
    """A streaming reply that tells the engine when its client goes away (`on_disconnect`), wherever the reply
    is: waiting in the queue, prefilling or decoding. Starlette's own listener only stops sending; the worker
    thread waiting for a queue place would still be admitted and prefilled."""

    def __init__(self, content, on_disconnect, **kwargs):
        super().__init__(content, **kwargs)
        self.on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as group:

            async def listen() -> None:
                await self.listen_for_disconnect(receive)
                self.on_disconnect()
                group.cancel_scope.cancel()

            group.start_soon(listen)
            try:
                await self.stream_response(send)
            except OSError:  # the client went away mid-send
                self.on_disconnect()
            group.cancel_scope.cancel()
