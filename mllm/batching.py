"""Continuous batching: the replies being generated decode together, one forward per step for all of them.

A `Batcher` owns the model thread: every model call of a server runs there, the prompts' prefill chunks
and image encodes (`run`) taking turns with the decode steps. One thread, because torch's CPU kernels run
on an OpenMP team per calling thread: with a second team on the same cores the workers stop spinning
between kernels and every small product waits on a wake-up (a decode step took 3.7x longer when run from
a second thread). Each decode step takes the model lock and steps the one decode driver,
`mllm.generation.DecodeBatch` (the same one a lone reply runs through): each running sequence's next token
sampled with that sequence's own settings (temperature, top-p, seed, penalty, stop tokens, token budget),
handed to its reader, and all of them fed in one forward. A reply joins at the first step after its prompt is prefilled and leaves when
it stops, runs out of budget, is cancelled or its reader goes away. Prompts are prefilled in chunks, one
chunk between two steps, so a long prompt never stalls the replies already streaming; the chunks of
prompts waiting together are prefilled in one packed forward (`mllm.generation.prefill_packed`: the
weights are read once for all of them). Every sequence keeps its own KV cache, so an answer does not
depend on what else is running.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager

import torch

from mllm.generation import DONE, DecodeBatch, Running, Sequence, prefill_chunks, prefill_in_turns, prefill_packed

JOB_BUDGET_S = 0.1  # the most time jobs take between two decode steps (one job always runs)
# The most prompt rows one packed prefill takes. Packing reads the weights once for all of them (four 63-token
# prompts: 115 ms against 167 one by one on the default model, 2 cores), and a batch that fills faster decodes
# wider: 16 conversations at once got 164 tok/s unpacked, 206 packing 256 rows, 252 packing 512, 242 at 1024.
# The price is one longer pause for the replies already running: a 512-row forward is ~0.25 s here.
PACK_ROWS = 512


class _Prefill:
    """A queued job: one prompt chunk (1, N, D) into its sequence's cache. Chunks queued together run packed."""

    def __init__(self, sequence: Sequence, chunk: torch.Tensor):
        self.sequence, self.chunk = sequence, chunk

    @property
    def rows(self) -> int:
        return self.chunk.shape[1]


class _Running(Running):
    """A sequence in the batch, with its reader's queue of tokens (token ids, then DONE, Cancelled() or an
    error)."""

    def __init__(self, sequence: Sequence, cancel: threading.Event | None):
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        super().__init__(sequence, cancel, self.out.put)


class Batcher:
    """Decodes every registered reply of `model` together; `lock` is the model lock every model call takes."""

    def __init__(self, model, lock: AbstractContextManager, max_batch: int = 64, exact: bool = False):
        """`exact`: wide batches stay on the int4 kernel, every reply bit for bit the reply decoded alone
        (`mllm.generation.feed`); the default takes the faster bf16 products there."""
        self.lock, self.max_batch = lock, max_batch
        self._cond = threading.Condition()
        self._jobs: deque[tuple[Callable, Future]] = deque()
        self._joining: list[_Running] = []
        self._batch = DecodeBatch(model, exact)  # the one decode driver (`mllm.generation`), stepped here
        # For the figures: mean batch = batched_tokens / steps; decode rate = batched_tokens / decode_s (the
        # time in decode steps alone, without the prompts' prefill and image encodes between them).
        self.steps = self.batched_tokens = 0
        self.decode_s = 0.0
        # Prompt chunks per prefill forward = prefilled_chunks / prefill_forwards.
        self.prefill_forwards = self.prefilled_chunks = 0
        # The model thread lives as long as the process (a new thread would mean a new OpenMP team) and is
        # stopped at exit: torch aborts ("terminate called ...") if a thread that ran its kernels is cut off.
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="mllm-model", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    @property
    def model(self):
        return self._batch.model

    @model.setter
    def model(self, model) -> None:  # a model loaded on this thread (`run(load)`) arrives after the thread
        self._batch.model = model

    @property
    def exact(self) -> bool:
        return self._batch.exact

    @exact.setter
    def exact(self, exact: bool) -> None:
        self._batch.exact = exact

    def close(self) -> None:
        """Stop the model thread once the running replies are done with (no new work is taken)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def run(self, fn: Callable, *args, **kwargs):
        """`fn(*args, **kwargs)` on the model thread, under the model lock, between two decode steps; its result
        (or its exception) here. Called on the model thread itself, it just runs."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        future: Future = Future()
        with self._cond:
            self._jobs.append((lambda: fn(*args, **kwargs), future))
            self._cond.notify()
        return future.result()

    def tokens(
        self,
        new_ids: torch.Tensor,
        cache,
        context_ids: list[int],
        gen,
        features: torch.Tensor | None,
        cancel: threading.Event | None,
        max_new_tokens: int,
    ) -> Iterator[int | None]:
        """`mllm.generation.stream_ids`, batched: the same tokens, a None after each prefill chunk but the last."""
        sequence = Sequence(self.model, cache, context_ids, new_ids, gen, max_new_tokens)
        chunks = self.run(lambda: list(prefill_chunks(self.model, new_ids, features)))
        # One chunk between two decode steps, packed with the other prompts' chunks queued with it.
        yield from prefill_in_turns(chunks, lambda chunk: self.prefill(sequence, chunk), cancel)
        running = _Running(sequence, cancel)
        self._join(running)
        try:
            while (item := running.out.get()) is not DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            running.abandoned = True  # a reader that stops early takes its sequence out of the batch

    @property
    def batch_size(self) -> int:
        """Replies in the batch (decoded at the last step, or joining at the next)."""
        return len(self._batch.running)

    @property
    def queued(self) -> int:
        """Jobs waiting for the model thread."""
        with self._cond:
            return len(self._jobs)

    def prefill(self, sequence: Sequence, chunk: torch.Tensor) -> None:
        """`sequence.prefill(chunk)` on the model thread, packed with the other prompt chunks queued with it."""
        if threading.current_thread() is self._thread:
            return sequence.prefill(chunk)
        future: Future = Future()
        with self._cond:
            self._jobs.append((_Prefill(sequence, chunk), future))
            self._cond.notify()
        return future.result()

    def _run_prefills(self, first: _Prefill, future: Future) -> None:
        """`first` and the prompt chunks queued behind it, up to PACK_ROWS rows, in one packed forward. Each
        reader thread waits on one job at a time, so taking chunks out of queue order delays nobody's own."""
        jobs, rows = [(first, future)], first.rows
        with self._cond:
            kept: deque = deque()
            for job in self._jobs:
                if isinstance(job[0], _Prefill) and rows + job[0].rows <= PACK_ROWS:
                    jobs.append(job)
                    rows += job[0].rows
                else:
                    kept.append(job)
            self._jobs = kept
        try:
            with self.lock:
                before = self.model.backend.prefill_forwards
                prefill_packed(self.model, [job.sequence for job, _ in jobs], [job.chunk for job, _ in jobs])
                self.prefill_forwards += self.model.backend.prefill_forwards - before
                self.prefilled_chunks += len(jobs)
        except BaseException as e:  # noqa: BLE001 - the callers get it, the thread goes on
            for _, waiting in jobs:
                waiting.set_exception(e)
            return
        for _, waiting in jobs:
            waiting.set_result(None)

    def _join(self, running: _Running) -> None:
        with self._cond:
            self._joining.append(running)
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs or self._joining or self._batch.running or self._closed)
                if self._closed and not self._jobs and not self._batch.running:
                    return
            # Jobs first (image encodes, prompt chunks), for up to JOB_BUDGET_S, then one decode step: new
            # prompts join the batch quickly, and the replies already streaming never wait longer than that.
            started = time.perf_counter()
            while True:
                with self._cond:
                    job = self._jobs.popleft() if self._jobs else None
                if job is None:
                    break
                fn, future = job
                job = None  # this loop's locals outlive the job: they must not keep its sequence alive
                if isinstance(fn, _Prefill):
                    self._run_prefills(fn, future)
                    fn = future = None
                    if time.perf_counter() - started > JOB_BUDGET_S:
                        break
                    continue
                try:
                    with self.lock:
                        future.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - the caller gets it, the thread goes on
                    future.set_exception(e)
                fn = future = None
                if time.perf_counter() - started > JOB_BUDGET_S:
                    break
            with self._cond:
                room = self.max_batch - len(self._batch.running)
                self._batch.running += self._joining[:room]
                self._joining = self._joining[room:]
                decode = bool(self._batch.running)
            if decode:
                with self.lock:
                    started = time.perf_counter()
                    try:
                        self._step()
                    except BaseException as e:  # noqa: BLE001 - the thread must live: its readers would wait forever
                        for running in self._batch.running:
                            self._batch.leave(running, e)
                        self._batch.running = []
                    self.decode_s += time.perf_counter() - started

    def _step(self) -> None:
        """One step of the decode batch: each running reply gets its next token, those that go on are fed in
        one forward."""
        going, tokens = self._batch.sample()
        if self._batch.feed(going, tokens):
            self.steps += 1
            self.batched_tokens += len(going)
