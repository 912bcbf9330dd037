"""A chat completion's reply over HTTP: stop strings, its `n` choices side by side, SSE chunks (`stream=true`) or one
JSON body, log probabilities in OpenAI's shape.

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
from mllm.logprobs import LogprobRecord


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
    """One reply (one choice), read from the engine's Stream in worker threads (each next() may wait its turn)."""

    def __init__(
        self,
        stream: Stream,
        limiter: anyio.CapacityLimiter,
        stops: list[str] | None = None,
        on_done=None,
        started: float | None = None,
        logprobs: LogprobRecord | None = None,
        decode=None,
    ):
        """`on_done(started, first, tokens)` is told when the reply ends (app.metrics): `started` (the request's
        arrival; default: now) and its first text on `time.perf_counter`'s clock (None without text), its token
        count. `logprobs`: the record its tokens' log probabilities go to (`mllm.logprobs`), each token's text
        from `decode([id])`."""
        self.stream, self.limiter = stream, limiter
        self.matcher = StopMatcher(stops or [])
        self.finish_reason = "stop"
        self.on_done, self.started, self.first = on_done, started or time.perf_counter(), None
        self.logprobs, self.decode, self._reported = logprobs, decode, 0

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

    async def text(self) -> str:
        async with aclosing(self.pieces()) as pieces:
            return "".join([piece async for piece in pieces])

    def cancel(self) -> None:
        """The client went away: stop the reply wherever it is (waiting for a place, prefilling, decoding)."""
        self.stream.stop()

    async def collect(self, http: Request) -> str:
        """The whole reply's text (a non-streaming request), stopped if the client goes away meanwhile."""
        return (await collect([self], http))[0]

    def new_logprobs(self) -> dict | None:
        """OpenAI's `logprobs` for the tokens not reported yet (None when the request did not ask for them)."""
        if self.logprobs is None:
            return None
        entries = self.logprobs.since(self._reported)
        self._reported += len(entries)

        def token(token_id: int, logprob: float) -> dict:
            text = self.decode([token_id])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "surrogatepass"))}

        content = [{**token(e.token, e.logprob), "top_logprobs": [token(i, lp) for i, lp in e.top]} for e in entries]
        return {"content": content, "refusal": None}


async def collect(completions: list[Completion], http: Request) -> list[str]:
    """Each reply's whole text, read side by side; all stopped if the client goes away meanwhile."""
    texts = [""] * len(completions)

    async def watch() -> None:  # the body is read: the next message is the client leaving
        while (await http.receive())["type"] != "http.disconnect":
            pass
        for completion in completions:
            completion.cancel()

    errors: list[Exception] = []

    async def read(k: int) -> None:
        try:
            texts[k] = await completions[k].text()
        except Exception as e:  # noqa: BLE001 - raised below as itself (a task group would wrap it), the others stop
            errors.append(e)
            for completion in completions:
                completion.cancel()

    async with anyio.create_task_group() as outer:
        outer.start_soon(watch)
        async with anyio.create_task_group() as readers:
            for k in range(len(completions)):
                readers.start_soon(read, k)
        outer.cancel_scope.cancel()
    if errors:  # the error handlers turn it into its status (a full queue: 503, a bad image: 400)
        raise errors[0]
    return texts


class ChatReply:
    """An OpenAI chat completion over its `n` choices: SSE chunks (`stream=true`) or one JSON body."""

    def __init__(self, choices: list[Completion], request: ChatRequest, model_id: str):
        self.choices, self.request, self.model_id = choices, request, model_id
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def cancel(self) -> None:
        for choice in self.choices:
            choice.cancel()

    def usage(self) -> dict:
        prompt = self.choices[0].stream.prompt_tokens
        completion = sum(c.stream.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _chunk(self, choices: list, **extra) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_id}
        return f"data: {json.dumps({**body, 'choices': choices, **extra})}\n\n"

    async def sse(self):
        def delta(k: int, d: dict, finish: str | None = None, logprobs=None) -> list:
            return [{"index": k, "delta": d, "logprobs": logprobs, "finish_reason": finish}]

        for k in range(len(self.choices)):
            yield self._chunk(delta(k, {"role": "assistant", "content": ""}))
        send, receive = anyio.create_memory_object_stream(max_buffer_size=64)

        async def read(k: int) -> None:
            choice = self.choices[k]
            try:
                async with aclosing(choice.pieces()) as pieces:
                    async for text in pieces:
                        await send.send(delta(k, {"content": text}, logprobs=choice.new_logprobs()))
                await send.send(delta(k, {}, choice.finish_reason, choice.new_logprobs()))
            except Exception as e:  # noqa: BLE001 - headers are sent: reported in the stream, as OpenAI does
                await send.send(e)

        async with anyio.create_task_group() as readers:
            for k in range(len(self.choices)):
                readers.start_soon(read, k)
            ended = 0
            async with receive:
                while ended < len(self.choices):
                    item = await receive.receive()
                    if isinstance(item, Exception):
                        error = {"message": str(item), "type": "server_error", "param": None, "code": None}
                        yield f"data: {json.dumps({'error': error})}\n\n"
                        readers.cancel_scope.cancel()
                        return
                    ended += item[0]["finish_reason"] is not None
                    yield self._chunk(item)
        if self.request.stream_options is not None and self.request.stream_options.include_usage:
            yield self._chunk([], usage=self.usage())
        yield "data: [DONE]\n\n"

    async def response(self, http: Request) -> dict:
        texts = await collect(self.choices, http)
        choices = [
            {
                "index": k,
                "message": {"role": "assistant", "content": text},
                "logprobs": choice.new_logprobs(),
                "finish_reason": choice.finish_reason,
            }
            for k, (choice, text) in enumerate(zip(self.choices, texts, strict=True))
        ]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model_id,
            "choices": choices,
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
