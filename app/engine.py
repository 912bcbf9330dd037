"""ChatEngine: the model behind the UI and the API. Conversations, streaming, cancel, a queue; no Gradio.

Concurrency and cancel live in app.scheduling: every model call runs under one fair lock held for a
single step, up to `max_concurrency` admitted replies take turns token by token, up to `max_queue`
more wait in line (past that: QueueFull), and `cancel(conv_id)` sets the reply's threading.Event
(the partial reply stays in the conversation; a request still in the queue changes nothing).
A conversation's state, its history and the LLaVA export writer live in app.conversation.
"""

from __future__ import annotations

import io
import itertools
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from app.conversation import RESERVED, Conversation, Turn, exchanges, rollback, write_llava
from app.prefix_cache import FeatureCache, PrefixCache, image_hash, prefix_key
from app.scheduling import Admission, ChatError, FairLock, Stream
from mllm.batching import Batcher
from mllm.constrained import Grammar
from mllm.errors import MLLMError
from mllm.generation import GenerationConfig, Reply, prefill_chunks
from mllm.image_processing import load_image
from mllm.llm import logical_parameters
from mllm.session import ChatSession, image_count, text_of

# Large images decoding at once across all requests. Each may briefly hold its decoded image and one
# intermediate, both capped by max_pixels (Pillow keeps RGB in 4 bytes a pixel): 0.3-0.8 GB at 40 Mpx, ~1 s.
# Images up to SMALL_IMAGE_PIXELS (a 12-megapixel phone photo) take no slot: an ordinary request never waits
# behind someone's eight 40-megapixel uploads.
DECODE_SLOTS = 2
SMALL_IMAGE_PIXELS = 12_000_000


def _keep_freed_memory_off_the_heap() -> None:
    """Large buffers (decoded images) always from mmap, so freeing one gives its memory back to the system.
    glibc otherwise raises its mmap threshold after the first such free and keeps later ones in per-thread
    heaps: a server that decoded a few 40-megapixel images from its worker threads then held ~5 GB."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: a fixed 1 MiB
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _header_pixels(source) -> int:
    """An image's pixel count from its header (nothing decoded); 0 when it cannot be read (the load says why)."""
    try:
        if isinstance(source, Image.Image):
            return source.width * source.height
        with Image.open(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source) as image:
            return image.width * image.height
    except Exception:  # noqa: BLE001 - the real load reports the problem with the image's name
        return 0


@contextmanager
def _user_errors():
    """The library's typed errors (images, messages, limits) -> ChatError with the same code."""
    try:
        yield
    except ChatError:
        raise
    except MLLMError as e:
        raise ChatError(str(e), e.code) from e


class ChatEngine:
    def __init__(
        self,
        model,
        name: str = "mllm",
        max_concurrency: int = 16,
        max_queue: int = 32,
        max_conversations: int = 64,
        gen: GenerationConfig | None = None,
        prefix_cache_mib: float = 256,
        batcher: Batcher | None = None,
        exact_batching: bool = False,
    ):
        """`prefix_cache_mib`: the KV pool for the stateless API's shared prefixes (`app.prefix_cache`); 0 turns
        prefix caching off (image features are still cached by content). `exact_batching`: every reply bit
        for bit the reply decoded alone, at the cost of slower wide batches (`mllm.batching.Batcher`)."""
        self.model, self.name, self.gen = model, name, gen or GenerationConfig()
        self.prefix_cache = PrefixCache(int(prefix_cache_mib * 2**20), model.backend) if prefix_cache_mib > 0 else None
        self.feature_cache = FeatureCache()
        self.generated_tokens = 0
        self._finished: deque[tuple[float, int]] = deque()  # (when, tokens) of replies done in the last minute
        self.max_conversations, self.max_concurrency, self.max_queue = max_conversations, max_concurrency, max_queue
        self._admission = Admission(max_concurrency, max_queue)
        # The model thread: every model call runs there, the admitted replies decode there as one batch.
        self.batcher = batcher or Batcher(model, FairLock(), max_batch=max_concurrency)
        self.batcher.max_batch, self.batcher.exact = max_concurrency, exact_batching
        self._model_lock = self.batcher.lock
        self._lock = threading.RLock()  # guards the conversation table; never held around a model call
        self._decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)
        _keep_freed_memory_off_the_heap()
        self._encode_lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()
        towers = itertools.chain(model.vision.parameters(), model.connector.parameters())
        self._parameters = sum(p.numel() for p in towers) + logical_parameters(model.llm)

    @classmethod
    def load(
        cls,
        name: str = "default",
        device: str | None = None,
        quantization: str | None = None,
        backend: str = "auto",
        **kwargs,
    ):
        """`load_model(name)` on a new model thread, and the engine over it."""
        from mllm.loading import load_model

        def load():
            return load_model(name, device=device, quantization=quantization, backend=backend)

        return cls.on_model_thread(load, name, **kwargs)

    @classmethod
    def on_model_thread(cls, load, name: str = "mllm", max_concurrency: int = 16, **kwargs):
        """The engine over `load()`'s model, loaded on the model thread it will run on (one OpenMP team)."""
        batcher = Batcher(None, FairLock(), max_batch=max_concurrency)
        batcher.model = batcher.run(load)
        return cls(batcher.model, name=name, max_concurrency=max_concurrency, batcher=batcher, **kwargs)

    @property
    def model_id(self) -> str:
        """The id clients name in API requests: 'default' or the checkpoint folder's name."""
        return Path(self.name).name or self.name

    # ---- conversations --------------------------------------------------------------------------
    def new_conversation(self, system: str | None = None) -> str:
        conv_id = uuid.uuid4().hex
        with self._lock:
            self._conversations[conv_id] = Conversation(
                ChatSession(self.model, system=system, gen=self.gen, batcher=self.batcher)
            )
            self._evict()
        return conv_id

    def _conversation(self, conv_id: str) -> Conversation:
        with self._lock:
            conv = self._conversations.get(conv_id)
            if conv is None:
                conv = self._conversations[conv_id] = Conversation(
                    ChatSession(self.model, gen=self.gen, batcher=self.batcher)
                )
                self._evict()
            self._conversations.move_to_end(conv_id)
            return conv

    def _evict(self) -> None:
        # Each idle conversation keeps its KV cache; forget the least recently used ones past the limit.
        idle = [k for k, c in self._conversations.items() if c.active is None]
        for conv_id in idle[: max(0, len(self._conversations) - self.max_conversations)]:
            del self._conversations[conv_id]

    @contextmanager
    def _reserved(self, conv_id: str, wait_s: float = 5.0, create: bool = True):
        """Exclusive use of a conversation while a request changes it; a stopping reply is waited for.
        Without `create`, an unknown conversation is an error rather than a new empty one."""
        with self._lock:
            if not create and conv_id not in self._conversations:
                raise ChatError("nothing to export yet: ask something and get an answer first")
            conv = self._conversation(conv_id)
            deadline = time.monotonic() + wait_s
            while isinstance(conv.active, Stream) and conv.active.cancel.is_set() and time.monotonic() < deadline:
                self._idle.wait(0.05)
            if conv.active is not None:
                raise ChatError("a reply is still being generated in this conversation; press Stop first", "busy")
            conv.active = RESERVED
        try:
            yield conv
        finally:
            with self._lock:
                if conv.active is RESERVED:
                    conv.active = None

    def _release(self, conv: Conversation, stream: Stream) -> None:
        with self._lock:
            if conv.active is stream:
                conv.active = None
            self._idle.notify_all()

    def cancel(self, conv_id: str) -> bool:
        """Stop the conversation's reply (between two tokens) or take it out of the queue."""
        with self._lock:
            conv = self._conversations.get(conv_id)
            stream = conv.active if conv is not None else None
        if not isinstance(stream, Stream):
            return False
        stream.stop()
        return True

    def clear(self, conv_id: str) -> None:
        """Forget the conversation; a reply still streaming is cancelled and writes into the old one."""
        self.cancel(conv_id)
        with self._lock:
            self._conversations.pop(conv_id, None)

    def has_conversation(self, conv_id: str) -> bool:
        """False once the conversation was cleared or forgotten (the least recently used past the limit)."""
        with self._lock:
            return conv_id in self._conversations

    def history(self, conv_id: str) -> list[Turn]:
        """The conversation's exchanges; none for one this engine does not hold (nothing is created)."""
        with self._lock:
            conv = self._conversations.get(conv_id)
        return [] if conv is None else [Turn(t, sources, reply) for t, _, sources, reply in exchanges(conv)]

    def set_system(self, conv_id: str, system: str | None) -> None:
        """The conversation's system prompt from its next turn on (None or blank: none). The history is kept; the
        next turn re-prefills it (a changed first message changes every position after it)."""
        system = system if system and system.strip() else None
        with self._lock:
            conv = self._conversations.get(conv_id)
            if conv is None or conv.session.system == system:
                return
        with self._reserved(conv_id, create=False) as conv:
            session = conv.session
            has_system = bool(session.messages) and session.messages[0]["role"] == "system"
            rest = session.messages[1:] if has_system else session.messages
            session.system = system
            session.messages = ([{"role": "system", "content": system}] if system else []) + rest

    def snapshot(self, conv_id: str) -> tuple[str | None, list[tuple[str, list, str | None]]]:
        """The conversation as it can be saved: its system prompt and (text, images as the model saw them, reply)
        per exchange; nothing for one this engine does not hold."""
        with self._lock:
            conv = self._conversations.get(conv_id)
            if conv is None:
                return None, []
            return conv.session.system, [(text, list(images), reply) for text, images, _, reply in exchanges(conv)]

    def restore(self, system: str | None, turns: list, sources: list | None = None) -> str:
        """A new conversation holding `turns` ((text, images, reply) per exchange, as `snapshot` gives them) after
        `system`; its images are encoded now, and its next turn prefills the history once. `sources`: what the
        caller shows for each image (default: the images). Returns its id."""
        turns = [turn for turn in turns if turn[2] is not None]  # a reply never started is not history
        messages = [{"role": "system", "content": system}] if system else []
        images = []
        for text, pictures, reply in turns:
            content = [{"type": "image"} for _ in pictures] + [{"type": "text", "text": text}]
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": reply}]
            images += pictures
        self._check_image_count(len(images))
        conv_id = self.new_conversation(system)
        with self._reserved(conv_id) as conv, _user_errors():
            self.batcher.run(conv.session.restore, messages, images)  # the image encode runs on the model thread
            conv.sources = list(sources) if sources is not None else list(images)
        return conv_id

    def seen(self, conv_id: str) -> dict:
        """What the model saw of the conversation: `images`, each as the tower received it (resized and padded or
        cropped to its input size, before normalisation), `tokens_per_image`, and `context_tokens` of
        `context_length` the conversation fills (its prompt as the next turn would send it)."""
        with self._lock:
            conv = self._conversations.get(conv_id)
        processor = self.model.processor
        info = {"images": [], "tokens_per_image": self.model.tokens_per_image, "context_tokens": 0}
        info["context_length"] = processor.max_length
        if conv is None or not conv.session.messages:
            return info
        session = conv.session
        info["images"] = list(session.images)
        with _user_errors(), self._encode_lock:
            info["context_tokens"] = len(processor.encode(session.messages, session.images, labels=False).input_ids)
        return info

    # ---- turns ----------------------------------------------------------------------------------
    def stream(self, conv_id: str, text: str, images: list | None = None, gen=None, on_queue=None) -> Stream:
        """Ask in a conversation: `images` (paths, bytes, PIL) go before the text. Iterate the result."""
        if not text.strip() and not images:
            raise ChatError("type a message or attach an image first")
        images = images or []
        self._check_image_count(len(images))
        names = [source if isinstance(source, str) else f"image {i + 1}" for i, source in enumerate(images)]
        pictures = list(zip(self._load_images(images, names), images))
        return self._turn(conv_id, text, pictures, gen, on_queue, replace_last=False)

    def regenerate(self, conv_id: str, gen=None, on_queue=None) -> Stream:
        """Drop the last reply and ask the same message again."""
        return self.edit_last(conv_id, None, gen, on_queue)

    def edit_last(self, conv_id: str, text: str | None, gen=None, on_queue=None) -> Stream:
        """Replace the last user message's text (same images) and answer it afresh."""
        conv = self._conversation(conv_id)
        with _user_errors():
            last = conv.session.messages[conv.session.last_user_index()]
        k = image_count(last)
        pictures = list(zip(conv.session.images[-k:], conv.sources[-k:])) if k else []
        return self._turn(conv_id, text_of(last) if text is None else text, pictures, gen, on_queue, True)

    def undo(self, conv_id: str) -> tuple[str, list]:
        """Drop the last exchange; returns its text and image sources so a UI can refill its input box."""
        with self._reserved(conv_id) as conv, _user_errors():
            cut = conv.session.last_user_index()
            k = image_count(conv.session.messages[cut])
            text, sources = text_of(conv.session.messages[cut]), conv.sources[len(conv.sources) - k :]
            rollback(conv, cut)
            return text, sources

    def _turn(self, conv_id, text, pictures, gen, on_queue, replace_last: bool) -> Stream:
        with self._reserved(conv_id) as conv, _user_errors():
            session = conv.session
            cut = session.last_user_index() if replace_last else len(session.messages)
            kept = len(session.images) - sum(image_count(m) for m in session.messages[cut:])
            images = [image for image, _ in pictures]
            if kept + len(images) > self.model.processor.max_images:
                raise ChatError(
                    f"this conversation would have {kept + len(images)} images; this model takes at most "
                    f"{self.model.processor.max_images} per conversation. Start a new conversation (Clear) for more",
                    "too_many_images",
                )
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
            candidate = session.messages[:cut] + [{"role": "user", "content": content}]
            # Check now, so a bad request fails at once instead of after its wait in the queue.
            self._encode(candidate, session.images[:kept] + images)

            def start(stream: Stream) -> Iterator[str]:
                # Runs once admitted: a request cancelled while queued has changed nothing.
                if replace_last:
                    rollback(conv, cut)
                pieces = self.batcher.run(session.send, text, images, gen or self.gen, stream.cancel)  # encodes images
                conv.sources.extend(source for _, source in pictures)
                return pieces

            release = partial(self._release, conv)
            stream = Stream(
                self._admission, self._model_lock, start, on_queue=on_queue, on_close=release, guard=_user_errors
            )
            conv.active = stream
            return stream

    # ---- stateless completion (the API) ---------------------------------------------------------
    def complete(self, messages: list[dict], gen=None, cancel=None, on_queue=None, exact_max_tokens=False) -> Stream:
        """Answer `messages` (mllm's format; image parts carry their `image`) with no stored state.

        A reply stops at the context length. With `exact_max_tokens` (the client asked for a number of tokens)
        a prompt that leaves less room than `gen.max_new_tokens` is refused, as OpenAI refuses it.
        """
        return self.complete_many(messages, [gen or self.gen], cancel, on_queue, exact_max_tokens)[0]

    def complete_many(
        self, messages: list[dict], gens: list[GenerationConfig], cancel=None, on_queue=None, exact_max_tokens=False
    ) -> list[Stream]:
        """`complete` once per config in `gens` (the API's `n` choices): the images are decoded and the prompt
        encoded once, and each reply is its own Stream, decoding in the batch beside the others (the image
        features are encoded once: the feature cache)."""

        def is_image(part) -> bool:
            return isinstance(part, dict) and part.get("type") == "image"

        messages = [dict(m) for m in messages]
        contents = [m["content"] for m in messages if isinstance(m.get("content"), list)]
        sources = [part.get("image") for content in contents for part in content if is_image(part)]
        self._check_image_count(len(sources))  # counted before any is decoded
        loaded = iter(self._load_images(sources, [f"image {i + 1}" for i in range(len(sources))]))
        for message in messages:
            if isinstance(message.get("content"), list):
                content = message["content"]
                message["content"] = [{"type": "image", "image": next(loaded)} if is_image(p) else p for p in content]
        encoded = self._encode(messages)
        limit, prompt = self.model.processor.max_length, len(encoded.input_ids)
        wanted = max(gen.max_new_tokens for gen in gens)
        if exact_max_tokens and limit is not None and prompt + wanted > limit:
            raise ChatError(
                f"this model's maximum context length is {limit} tokens, but {prompt + wanted} were "
                f"requested ({prompt} in the messages, {wanted} in the completion); reduce the length "
                "of the messages or max_tokens",
                "context_length_exceeded",
            )
        # Several choices share the prompt's prefill: the first to start puts its KV in the prefix cache.
        share = threading.Lock() if len(gens) > 1 and self.prefix_cache is not None else None
        streams = []
        try:
            for gen in gens:
                start = partial(self._generate, encoded, gen)  # called with the Stream
                if share is not None:
                    start = partial(start, share=share)
                stream = Stream(
                    self._admission, self._model_lock, start, cancel=cancel, on_queue=on_queue, guard=_user_errors
                )
                stream.prompt_tokens = len(encoded.input_ids)
                streams.append(stream)
        except BaseException:  # a full queue: the places already taken go back
            for stream in streams:
                stream.close()
            raise
        return streams

    def _generate(self, encoded, gen: GenerationConfig, stream: Stream, share=None) -> Iterator[str]:
        """The reply to `encoded`, prefilling only what no earlier request's KV holds and encoding only unseen
        images. The API reports token counts and finish_reason, so the engine keeps the Reply, not just its text.
        `share`: the lock of a request's choices, the first of which prefills the prompt for all (`_share_prompt`)."""
        model = self.model
        hashes = [image_hash(image) for image in encoded.images]
        key = prefix_key(encoded, model.image_token_id, hashes)
        if share is not None:
            with share:
                self.batcher.run(self._share_prompt, encoded, key, hashes)
        # The cache copy and the image encode run on the model thread (their kernels too: one OpenMP team).
        cache, reused = self.batcher.run(self.prefix_cache.lookup, key) if self.prefix_cache is not None else (None, 0)
        cached_images = sum(1 for k in key[:reused] if isinstance(k, tuple) and k[1] == 0)  # whole images in it
        features = self.batcher.run(self.feature_cache.features, model, encoded, hashes, first=cached_images)
        answer = Reply(
            model,
            encoded.input_ids[reused:],
            gen,
            cache=cache,
            context_ids=encoded.input_ids[:reused].tolist(),
            features=features,
            cancel=stream.cancel,
            batcher=self.batcher,
        )
        stream.cached_tokens = reused
        try:
            yield from answer
            stream.finish_reason = answer.finish_reason
        finally:
            stream.completion_tokens = len(answer.ids)
            self._count(len(answer.ids))
            if self.prefix_cache is not None:  # the prompt and the reply, as far as the cache holds them
                self.prefix_cache.store((key + tuple(answer.ids))[: answer.cache.get_seq_length()], answer.cache)

    @torch.inference_mode()
    def _share_prompt(self, encoded, key: tuple, hashes: list[str]) -> None:
        """On the model thread: the prompt's KV but for its last position (each reply prefills that one for its
        logits) into the prefix cache, unless it is there already, so the choices copy it instead of each
        prefilling the prompt."""
        if self.prefix_cache.covered(key) >= len(key) - 1:
            return
        cache, reused = self.prefix_cache.lookup(key)
        cached_images = sum(1 for k in key[:reused] if isinstance(k, tuple) and k[1] == 0)
        features = self.feature_cache.features(self.model, encoded, hashes, first=cached_images)
        cache = cache if cache is not None else self.model.backend.new_cache()
        for chunk in prefill_chunks(self.model, encoded.input_ids[reused:-1], features):  # (1, <=C, D)
            self.model.backend.prefill([cache], [chunk[0]])
        self.prefix_cache.store(key[:-1], cache)

    def _tokens_per_s(self) -> float:
        since = time.monotonic() - 60
        with self._lock:
            return round(sum(n for when, n in self._finished if when >= since) / 60, 2)

    def _count(self, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.generated_tokens += tokens
            self._finished.append((now, tokens))
            while self._finished and self._finished[0][0] < now - 60:
                self._finished.popleft()

    def json_grammar(self, schema: dict | None = None, strict: bool = True) -> Grammar:
        """A grammar holding a reply to `schema` (a JSON Schema), or to any JSON object when None, for this model's
        tokenizer (`mllm.constrained`); a GrammarError names what is wrong with the schema."""
        processor = self.model.processor
        stops = list(processor.stop_token_ids)
        if schema is None:
            return Grammar.json_object(processor.tokenizer, stops)
        return Grammar.json_schema(processor.tokenizer, stops, schema, strict)

    # ---- request checks, off the model thread --------------------------------------------------
    def _check_image_count(self, n: int) -> None:
        limit = self.model.processor.max_images
        if n > limit:
            raise ChatError(
                f"the request has {n} images; this model takes at most {limit} per conversation: send fewer",
                "too_many_images",
            )

    def _load_images(self, sources: list, names: list[str]) -> list:
        """Decode each image within the processor's limits and keep only the model-sized pixels (what the
        tower sees: 150 KB at 224 px, 340 KB at 336) rather than the decoded original (up to 160 MB). At most
        DECODE_SLOTS large images decode at once, so the transient peak is bounded whatever the number of
        clients."""
        loaded = []
        with _user_errors():
            for source, name in zip(sources, names, strict=True):
                large = _header_pixels(source) > SMALL_IMAGE_PIXELS
                with self._decode_slots if large else nullcontext():
                    loaded.append(self.model.processor.image_processor.load(source, name=name))
        return loaded

    def _encode(self, messages: list[dict], images: list | None = None):
        """Template and tokens for generation, in the caller's thread: the model thread only runs the model.
        One encode at a time (the tokenizer's settings are shared state)."""
        with _user_errors(), self._encode_lock:
            return self.model.processor.encode(messages, images, add_generation_prompt=True, labels=False)

    # ---- export and info ------------------------------------------------------------------------
    def export_llava(self, conv_id: str, directory: str | Path) -> Path:
        """Write the conversation as a LLaVA JSON file (a list of one row) with its images as PNG beside it.

        Exchanges without an answer (stopped before the first token) are left out: a training row
        needs every answer. Images are written as the user gave them where their source can still be read (the
        conversation itself keeps only the model-sized copy); else as the model saw them. Returns the JSON
        file's path (read it with training.data.read_rows).
        """
        with self._reserved(conv_id, create=False) as conv:
            answered = [e for e in exchanges(conv) if e[3] and e[3].strip()]
            system = [m["content"] for m in conv.session.messages if m["role"] == "system"]
        if not answered:
            raise ChatError("nothing to export yet: ask something and get an answer first")
        originals = [
            (text, [self._original(source, seen) for seen, source in zip(images, sources)], sources, reply)
            for text, images, sources, reply in answered
        ]
        return write_llava(directory, originals, system, self.model.processor.image_token)

    def _original(self, source, seen):
        with self._decode_slots:
            try:
                return load_image(source, max_pixels=self.model.processor.image_processor.max_pixels)
            except (MLLMError, TypeError):  # an upload since deleted, or a source that cannot be read again
                return seen

    def info(self) -> dict:
        """What the model panel and /v1/models show."""
        model, cfg = self.model, self.model.config
        tensors = list(itertools.chain(model.parameters(), model.buffers()))
        running, waiting = self._admission.counts()
        info = {
            "model": self.name,
            "vision": cfg.vision.kind + (f" ({cfg.vision.path})" if cfg.vision.path else ""),
            "connector": cfg.connector.kind,
            "llm": cfg.llm.path,
            "quantization": cfg.llm.quantization,
            "backend": model.backend.name,
            "device": str(model.device),
            # As the architectures define them, however the weights are stored (packed int4, GGUF in llama.cpp).
            "parameters": self._parameters,
            "weights_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "tokens_per_image": model.tokens_per_image,
            "max_images": model.processor.max_images,
            "context_length": model.processor.max_length,
            "running": running,
            "waiting": waiting,
            "generated_tokens": self.generated_tokens,
            # Replies finished in the last minute, over that minute: the load the server has carried lately.
            "tokens_per_s": self._tokens_per_s(),
            **self.feature_cache.stats(),
            **(self.prefix_cache.stats() if self.prefix_cache is not None else {"prefix_cache_mib": 0}),
        }
        if model.device.type == "cuda":
            info["cuda_allocated_bytes"] = torch.cuda.memory_allocated(model.device)
        return info
