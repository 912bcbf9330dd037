"""Scheduling for ChatEngine: who may run the model, when, and in what order. No model code here.

One model lock, held per step. One set of weights is not safe for simultaneous forward passes (on
CPU they would also fight over the same cores), so every model call (an image encode, a prefill,
one decoded token) runs under one FairLock. A generation holds it for a single step at a time and
takes a ticket again for the next, so the lock goes round in arrival order.

Admitted replies decode together. Up to `max_running` (the engine's `max_concurrency`) generations
are admitted at once; `mllm.batching.Batcher` decodes all of them in one forward per step (each with
its own KV cache and sampling settings, so an answer never depends on what else is running), and
prompts are prefilled in chunks that take the model lock in turn with those steps.

A bounded waiting queue. Up to `max_waiting` (`max_queue`) more requests wait in a FIFO line and
are told their 1-based position whenever it changes (`on_queue`); past that a request is refused
at once with QueueFull, before any reply has started. When a generation ends its place goes to
the first in line.

Cancellation via threading.Event. Every Stream owns an Event (or is given one). Setting it stops a
running generation between two tokens (the decode loop checks it; the partial reply stays, as in
any chat app), and takes a waiting request out of the line without it ever having started.
`Admission.poke` wakes the waiters so a cancelled one leaves at once.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext

from mllm.errors import MLLMError

OnQueue = Callable[[int], None]  # called with the 1-based queue position while a request waits


class ChatError(MLLMError):
    """A request the user can fix. `code` (set per error) names the kind; the API answers it as OpenAI's error code."""

    def __init__(self, message: str, code: str = "invalid_request"):
        super().__init__(message)
        self.code = code


class QueueFull(ChatError):
    def __init__(self, message: str):
        super().__init__(message, "overloaded")


class FairLock:
    """A ticket lock: taken in arrival order, so generations alternate token by token (threading.Lock is
    unfair: the thread that just released it usually takes it straight back)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._next = self._serving = 0

    def __enter__(self):
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            self._cond.wait_for(lambda: self._serving == ticket)
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class Admission:
    """A semaphore with a bounded FIFO line: `join` admits or queues (or raises QueueFull), `wait` blocks
    until admitted or cancelled, `leave` frees the place and admits the next in line."""

    def __init__(self, max_running: int, max_waiting: int):
        if max_running < 1 or max_waiting < 0:
            raise ValueError(f"need max_concurrency >= 1 and max_queue >= 0, got {max_running}, {max_waiting}")
        self.max_running, self.max_waiting = max_running, max_waiting
        self._cond = threading.Condition()
        self._running: set[object] = set()
        self._waiting: deque[object] = deque()

    def join(self, ticket: object) -> None:
        with self._cond:
            if len(self._running) < self.max_running and not self._waiting:
                self._running.add(ticket)
            elif len(self._waiting) >= self.max_waiting:
                raise QueueFull(
                    f"the server is busy: {len(self._running)} replies are being generated and "
                    f"{len(self._waiting)} are waiting (the limit); try again in a moment"
                )
            else:
                self._waiting.append(ticket)

    def wait(self, ticket: object, cancel: threading.Event, on_queue: OnQueue | None = None) -> bool:
        """True once admitted; False if cancelled while waiting."""
        shown = None
        while True:
            with self._cond:
                while ticket in self._waiting and not cancel.is_set() and self._waiting.index(ticket) + 1 == shown:
                    self._cond.wait(0.25)  # woken by leave() / poke(); the timeout is a safety net
                if ticket in self._running:
                    return True
                if cancel.is_set() or ticket not in self._waiting:
                    return False
                shown = self._waiting.index(ticket) + 1
            if on_queue is not None:
                on_queue(shown)  # outside the lock: a UI callback may be slow

    def leave(self, ticket: object) -> None:
        with self._cond:
            self._running.discard(ticket)
            if ticket in self._waiting:
                self._waiting.remove(ticket)
            while self._waiting and len(self._running) < self.max_running:
                self._running.add(self._waiting.popleft())
            self._cond.notify_all()

    def poke(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def counts(self) -> tuple[int, int]:
        with self._cond:
            return len(self._running), len(self._waiting)


class Stream(Iterator[str]):
    """One generation: iterate for text pieces. Ending, erroring or `close()` frees its place in the queue.

    `start(stream)` runs once admitted, under `guard()` (the engine's error translation), and returns the
    piece iterator; both run their model calls on the engine's model thread (`mllm.batching.Batcher.run`).
    Afterwards `finish_reason` says how it ended: "stop", "length" (`complete` only: session turns
    can't tell it from "stop") or "cancelled"; `complete` also counts `completion_tokens`.
    """

    def __init__(
        self,
        admission: Admission,
        model_lock: FairLock,
        start: Callable[[Stream], Iterator[str]],
        cancel: threading.Event | None = None,
        on_queue: OnQueue | None = None,
        on_close: Callable[[Stream], None] | None = None,
        guard: Callable[[], AbstractContextManager] = nullcontext,
    ):
        self._closed = True  # until admitted: __del__ of a refused stream must not leave() the queue
        self._admission, self._model_lock = admission, model_lock
        self._start, self._on_queue, self._on_close, self._guard = start, on_queue, on_close, guard
        self.cancel = cancel or threading.Event()
        self._pieces: Iterator[str] | None = None
        self.prompt_tokens = self.completion_tokens = 0
        self.finish_reason: str | None = None
        admission.join(self)  # a full queue refuses now, before any reply has started
        self._closed = False

    def __next__(self) -> str:
        if self._closed:
            raise StopIteration
        try:
            if self._pieces is None:
                if not self._admission.wait(self, self.cancel, self._on_queue):
                    self.finish_reason = "cancelled"
                    raise StopIteration
                with self._guard():  # start runs its model calls on the engine's model thread
                    self._pieces = self._start(self)
            while True:
                piece = next(self._pieces)  # the pieces take the model lock themselves (mllm.batching)
                if piece:  # an empty piece marks a prefill chunk: the lock went round before the next one
                    return piece
        except BaseException as e:  # done, cancelled or failed: this generation is over either way
            if isinstance(e, StopIteration) and self.finish_reason is None:
                self.finish_reason = "cancelled" if self.cancel.is_set() else "stop"
            self.close()
            raise

    def stop(self) -> None:
        """Cancel from any thread: a running reply stops between two tokens, a waiting one leaves the line."""
        self.cancel.set()
        self._admission.poke()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._pieces is not None:
                self._pieces.close()
        finally:
            self._admission.leave(self)
            if self._on_close is not None:
                self._on_close(self)

    def __del__(self):
        self.close()
