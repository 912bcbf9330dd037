"""Generation: prefill once, then decode token by token from the KV cache, as an iterator.

`DecodeBatch` is the one decode driver: each step samples every running sequence's next token with its own
settings and feeds all that go on in one forward. A lone reply (`stream_ids`) is a batch of one stepped
inline; a server's `mllm.batching.Batcher` steps one batch on its model thread. `Reply` is the one recipe
around either (prompt ids + image features -> cache -> tokens -> text); `stream` / `generate` use it for a
single request and `ChatSession` (mllm.session) to reuse the cache across turns. Sampling uses transformers' logits
processors, so temperature / top-p / repetition penalty mean exactly what they mean there.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mllm.constrained import Grammar
from mllm.logprobs import LogprobRecord
from mllm.processor import Encoded


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    """Most tokens in one reply."""
    temperature: float = 0.0
    """0 is greedy decoding; higher samples more freely."""
    top_p: float = 1.0
    """Nucleus sampling mass (used when temperature > 0)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (used when temperature > 0); 0 turns it off."""
    repetition_penalty: float = 1.0
    """>1 discourages repeating earlier tokens (CTRL-style, as in transformers)."""
    seed: int | None = None
    """Seed for sampling, for reproducible answers."""
    ignore_eos: bool = False
    """Keep going past end-of-turn tokens (benchmarks that need a fixed token count)."""
    constraint: Grammar | None = None
    """Hold the reply to a grammar (`mllm.constrained`: a JSON schema); each reply keeps its own place in it."""
    logprobs: LogprobRecord | None = None
    """Where the log probability of each token goes (`mllm.logprobs`): one record for one reply alone."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 turns it off)")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed={self.seed} must fit in 64 bits")

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.temperature > 0:
            procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


PREFILL_CHUNK = 128  # tokens per prefill call: bounds one step (0.7 s at 7k tokens on 2 cores), matmuls stay wide


class Cancelled(Exception):
    """Raised inside a stream when its cancel event is set (the caller stops reading)."""


class Sequence:
    """One reply being decoded: its KV cache (the model's backend's: `mllm.backends`), the logits of what comes
    next, and its own sampling state (logits processors, seeded generator, stop tokens, token budget).
    A `DecodeBatch` decodes it, alone (`stream_ids`) or with others (`mllm.batching.Batcher`)."""

    def __init__(
        self,
        model,
        cache,
        context_ids: list[int],
        new_ids: torch.Tensor,
        gen: GenerationConfig,
        max_new_tokens: int,
    ):
        self.model, self.cache, self.gen = model, cache, gen
        self.stops = set() if gen.ignore_eos else set(model.processor.stop_token_ids)
        self.procs = gen.processors()
        self.generator = None
        if gen.temperature > 0 and gen.seed is not None:
            self.generator = torch.Generator(device=model.device).manual_seed(gen.seed)
        self.history = [t for t in context_ids + new_ids.tolist() if t != model.image_token_id]
        self.remaining = max_new_tokens
        self.constraint = gen.constraint.start() if gen.constraint is not None else None
        self.logits: torch.Tensor | None = None  # (1, V) once prefilled

    def prefill(self, embeds: torch.Tensor) -> None:
        """`embeds` (1, L, D) appended to the cache; `logits` becomes what follows them."""
        self.logits = self.model.backend.prefill([self.cache], [embeds[0]])  # (1, V)

    def sample(self) -> int | None:
        """The next token from `logits`, or None when the reply is over (a stop token, no budget left, or the
        grammar's document complete). With a grammar, only the tokens it allows next can be sampled."""
        if self.remaining <= 0 or (self.constraint is not None and self.constraint.finished):
            return None
        scores = self.logits.float()  # (1, V)
        if self.constraint is not None:  # before the warpers: top-p keeps its mass among the allowed tokens
            scores = self.constraint.mask(scores.clone())
        if self.procs:
            scores = self.procs(torch.tensor([self.history], device=scores.device), scores)
        if self.gen.temperature > 0:
            token = int(torch.multinomial(scores.softmax(-1), 1, generator=self.generator))
        else:
            token = int(scores.argmax(-1))
        if token in self.stops:
            return None
        if self.constraint is not None:
            self.constraint.advance(token)
        if self.gen.logprobs is not None:
            self.gen.logprobs.add(self.logits, token)
        self.history.append(token)
        self.remaining -= 1
        return token


def prefill_packed(model, sequences: list[Sequence], chunks: list[torch.Tensor]) -> None:
    """`Sequence.prefill` for several sequences, chunks (1, N_i, D) each, in as few forwards as the backend
    can (the int4 one packs them: the weights read once for all)."""
    logits = model.backend.prefill([s.cache for s in sequences], [chunk[0] for chunk in chunks])  # (S, V)
    for row, sequence in enumerate(sequences):
        sequence.logits = logits[row : row + 1]


def feed(model, sequences: list[Sequence], tokens: list[int], exact: bool = False) -> None:
    """Append one token to each sequence's cache and set its next logits, in one forward for all of them where
    the backend batches (each sequence keeps its own cache). `exact`: every reply bit for bit the reply decoded
    alone, where the backend's fast wide step is not (`mllm.backends`)."""
    logits = model.backend.step(tokens, [s.cache for s in sequences], exact=exact)  # (B, V)
    for i, sequence in enumerate(sequences):
        sequence.logits = logits[i : i + 1]


def release(model, sequence: Sequence) -> None:
    """`sequence` leaves the batch `feed` decodes it in: its cache holds every position fed so far again
    (a batch's keys / values sit side by side while it runs)."""
    model.backend.release(sequence.cache)


def prefill_chunks(model, new_ids, image_features, prefill_chunk: int = PREFILL_CHUNK) -> Iterator[torch.Tensor]:
    """The prompt's input embeddings (image features in their slots) in chunks of `prefill_chunk`: (1, <=C, D)."""
    with torch.inference_mode():
        embeds = model.embed(new_ids[None].to(model.device), image_features=image_features)  # (1, L_new, D)
    for start in range(0, embeds.shape[1], prefill_chunk):
        yield embeds[:, start : start + prefill_chunk]


def prefill_in_turns(chunks: Iterable[torch.Tensor], prefill, cancel: threading.Event | None) -> Iterator[None]:
    """`prefill(chunk)` for each chunk, a None yielded between two: whoever drives the generator gets control
    back there (a shared model lets other replies run). A set `cancel` stops it before the next chunk."""
    for k, chunk in enumerate(chunks):
        if k:
            yield None
        if cancel is not None and cancel.is_set():
            raise Cancelled
        prefill(chunk)


DONE = object()  # the end marker a `Running` is handed when its reply is over


class Running:
    """A sequence in a `DecodeBatch` and where its output goes: `put` receives its token ids, then DONE,
    a Cancelled() or the error that ended it."""

    def __init__(self, sequence: Sequence, cancel: threading.Event | None, put):
        self.sequence, self.cancel, self.put = sequence, cancel, put
        self.abandoned = False  # the reader stopped reading: leave at the next step


class DecodeBatch:
    """The sequences decoding together. `sample` hands each its next token (sampled with its own settings)
    and says which go on; `feed` appends those tokens in one forward for all (`feed` below; each sequence
    keeps its own cache, so a reply does not depend on what else runs). A sequence leaves when it stops, runs
    out of budget, is cancelled, its reader went away or its step failed; its cache is whole again
    (`release`) before its reader is told."""

    def __init__(self, model, exact: bool = False):
        """`exact`: every reply bit for bit the reply decoded alone, where the backend's wide step is not."""
        self.model, self.exact = model, exact
        self.running: list[Running] = []

    @torch.inference_mode()
    def sample(self) -> tuple[list[Running], list[int]]:
        """One token for each running sequence, handed to its `put`; those that go on and their tokens."""
        going, tokens = [], []
        for running in self.running:
            if running.abandoned:
                self.leave(running, None)
                continue
            if running.cancel is not None and running.cancel.is_set():
                self.leave(running, Cancelled())
                continue
            try:
                token = running.sequence.sample()
            except Exception as e:  # noqa: BLE001 - a sampling error belongs to that reply alone
                self.leave(running, e)
                continue
            if token is None:
                self.leave(running, DONE)
                continue
            running.put(token)
            if running.sequence.remaining > 0:
                going.append(running)
                tokens.append(token)
            else:
                self.leave(running, DONE)
        self.running = going
        return going, tokens

    @torch.inference_mode()
    def feed(self, going: list[Running], tokens: list[int]) -> bool:
        """Feed `tokens` to `going` in one forward; False (each told, each gone) if that forward failed."""
        if not going:
            return False
        try:
            feed(self.model, [r.sequence for r in going], tokens, exact=self.exact)
        except Exception as e:  # noqa: BLE001 - tell every reader, the driver goes on
            for running in going:
                self.leave(running, e)
            self.running = [r for r in self.running if r not in going]
            return False
        return True

    def leave(self, running: Running, last) -> None:
        """Take `running` out (its cache whole again first), then hand it `last` (None: nobody reads)."""
        release(self.model, running.sequence)
        if last is not None:
            running.put(last)


@torch.inference_mode()
def stream_ids(
    model,
    new_ids: torch.Tensor,
    cache,
    context_ids: list[int],
    gen: GenerationConfig,
    image_features: torch.Tensor | None = None,
    cancel: threading.Event | None = None,
    max_new_tokens: int | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
) -> Iterator[int | None]:
    """Prefill `new_ids` (L_new,) on top of `cache`, then yield sampled token ids until a stop token: a
    `DecodeBatch` of one, stepped here.

    `context_ids` are the ids already in the cache (the repetition penalty sees the whole history);
    the cache is extended in place, so after the loop it holds context + new_ids + the yielded tokens
    (the last one only if the caller asked for more). `image_features` (n_img, N_img, D_llm) are those of
    the images in `new_ids`, computed by the caller (`image_features`, which passes instructions to a
    text-reading Q-Former). `max_new_tokens` (default `gen.max_new_tokens`) bounds the reply; `Reply` passes
    what the context has room for. A long prompt is prefilled `prefill_chunk` tokens at a time, with a None
    yielded between two chunks: the caller gets control back, so one long prompt never holds a shared model
    for its whole prefill.
    """
    budget = gen.max_new_tokens if max_new_tokens is None else max_new_tokens
    sequence = Sequence(model, cache, context_ids, new_ids, gen, budget)
    chunks = prefill_chunks(model, new_ids, image_features, prefill_chunk)
    yield from prefill_in_turns(chunks, sequence.prefill, cancel)
    out: list = []
    batch = DecodeBatch(model)
    batch.running = [Running(sequence, cancel, out.append)]
    while True:
        going, tokens = batch.sample()
        for item in out:
            if item is DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # before the token is fed: the reader has it one forward sooner
        out.clear()
        batch.feed(going, tokens)


class TextStream:
    """Incremental detokenizer: feed ids, get the new text; holds back half-formed UTF-8 characters."""

    def __init__(self, processor):
        self.processor = processor
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.processor.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """The text held back at the end of the reply (a character that never completed shows as U+FFFD,
        as a one-shot decode of the same ids gives it): nothing generated is dropped."""
        return self._emit(self.processor.decode(self.ids))

    def pieces(self, tokens: Iterable[int | None]) -> Iterator[str]:
        """The text of `tokens` piece by piece as they arrive, the held-back tail at the end; a None (a prefill
        chunk done) passes through as an empty piece."""
        for token in tokens:
            if token is None:
                yield ""
            elif piece := self.push(token):
                yield piece
        if tail := self.flush():
            yield tail

    def _emit(self, text: str) -> str:
        piece, self.emitted = text[self.emitted :], len(text)
        return piece


@torch.inference_mode()
def image_features(model, encoded: Encoded, first: int = 0) -> torch.Tensor | None:
    """Features of `encoded`'s images from the `first`-th on: (n_img - first, N_img, D_llm), or None.

    The processor turns the images (and, for a text-reading Q-Former, their instructions) into tensors;
    the model only sees those.
    """
    inputs = model.processor.image_inputs(encoded, first)
    return None if inputs is None else model.get_image_features(**inputs)


class Reply(Iterator[str]):
    """One assistant reply, decoded on top of `cache`: iterate for its text pieces.

    The decode recipe every caller shares (`stream`, `ChatSession`, the engine, the benchmarks): prefill
    `new_ids` with `features` in their image slots, stream tokens (`stream_ids`), detokenize them
    (`TextStream`). Afterwards `ids` holds the generated token ids and `finish_reason` says how it ended:
    "stop" (a stop token), "length" (`max_new_tokens`) or "cancelled" (the event was set; the text so far
    stands). `context_ids` are the ids already in `cache`. A prompt longer than PREFILL_CHUNK tokens is
    prefilled in chunks, and an empty piece marks each chunk done (a shared engine lets others run there).
    With a `batcher` (`mllm.batching.Batcher`) the reply decodes in its batch, with the same tokens.
    """

    def __init__(
        self,
        model,
        new_ids: torch.Tensor,
        gen: GenerationConfig,
        cache=None,
        context_ids: list[int] | None = None,
        features: torch.Tensor | None = None,
        cancel: threading.Event | None = None,
        batcher=None,
    ):
        self.cache = cache if cache is not None else model.backend.new_cache()
        self.finish_reason: str | None = None
        self._text = TextStream(model.processor)
        context_ids = context_ids or []
        # The reply stops at the context length whatever max_new_tokens says ("length", as at max_new_tokens).
        self.max_new_tokens = gen.max_new_tokens
        if (limit := model.processor.max_length) is not None:
            self.max_new_tokens = max(0, min(gen.max_new_tokens, limit - len(context_ids) - len(new_ids)))
        if batcher is not None:  # decoded together with the other running replies (`mllm.batching`)
            tokens = batcher.tokens(new_ids, self.cache, context_ids, gen, features, cancel, self.max_new_tokens)
        else:
            tokens = stream_ids(model, new_ids, self.cache, context_ids, gen, features, cancel, self.max_new_tokens)
        self._pieces = self._run(tokens)

    @property
    def ids(self) -> list[int]:
        return self._text.ids

    def _run(self, tokens: Iterator[int]) -> Iterator[str]:
        try:
            yield from self._text.pieces(tokens)
            self.finish_reason = "length" if len(self.ids) >= self.max_new_tokens else "stop"
        except Cancelled:
            self.finish_reason = "cancelled"

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()


def reply(model, encoded: Encoded, gen: GenerationConfig, cancel: threading.Event | None = None) -> Reply:
    """The reply to one encoded prompt (`processor.encode(..., add_generation_prompt=True)`), from a fresh cache."""
    return Reply(model, encoded.input_ids, gen, features=image_features(model, encoded), cancel=cancel)


def stream(
    model,
    messages: list[dict],
    images: list | None = None,
    gen: GenerationConfig | None = None,
    cancel: threading.Event | None = None,
    **gen_kwargs,
) -> Iterator[str]:
    """Stream the assistant's reply to `messages` as text pieces (a cancelled reply ends early)."""
    gen = gen or GenerationConfig(**gen_kwargs)
    encoded = model.processor.encode(messages, images, add_generation_prompt=True, labels=False)
    pieces = reply(model, encoded, gen, cancel)
    yield from filter(None, pieces)  # no empty prefill-progress pieces


def generate(model, messages: list[dict], images: list | None = None, **kwargs) -> str:
    """The whole reply to `messages` as one string."""
    return "".join(stream(model, messages, images, **kwargs))
