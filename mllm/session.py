"""ChatSession: a multi-turn conversation that keeps the KV cache between turns.

Each turn renders the whole conversation, finds the longest prefix whose keys/values are
already cached, crops the cache there and prefills only the rest. Re-rendering (instead of
appending text) keeps the template the single source of truth; the prefix match makes the
follow-up cost proportional to the new tokens, not to the history.

Image features are computed once, when their turn is sent: an InstructBLIP-style Q-Former reads the text of
the turn holding the image, and a sent turn never changes (editing one is a rollback and a new turn).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from mllm.errors import MessageError
from mllm.generation import GenerationConfig, Reply, image_features


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def image_count(message: dict) -> int:
    """How many images a message carries (assistant replies and system prompts have string content: none)."""
    content = message["content"]
    return sum(1 for part in content if part.get("type") == "image") if isinstance(content, list) else 0


def text_of(message: dict) -> str:
    """A message's text, without its image parts."""
    content = message["content"]
    return "".join(p["text"] for p in content if p.get("type") == "text") if isinstance(content, list) else content


class ChatSession:
    def __init__(self, model, system: str | None = None, gen: GenerationConfig | None = None, batcher=None):
        """`batcher`: a `mllm.batching.Batcher` to decode in (a server's sessions share one); None decodes alone."""
        self.model = model
        self.system = system
        self.gen = gen or GenerationConfig()
        self.batcher = batcher
        self.reset()

    def reset(self) -> None:
        """Forget the conversation, its images and the cache."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list = []  # sources, in placeholder order
        self._features: list[torch.Tensor] = []  # per image: (N_img, D_llm), computed once
        self._cache = self.model.backend.new_cache()
        self._cached_ids: list[int] = []  # exactly the ids whose keys/values are in the cache
        self.last_prefill_tokens = 0  # how many tokens the last turn had to prefill (for benchmarks)

    def rollback(self, n_messages: int) -> None:
        """Keep the first `n_messages` messages and their images (undo / regenerate / edit).

        The next turn's prefix match crops the KV cache, except where an image was dropped: every image's
        slots hold the same token id, so a new image (or the same one under a new instruction) in the same
        place would match the old one's keys/values. The cache is forgotten from the first dropped image on.
        """
        dropped = sum(image_count(m) for m in self.messages[n_messages:])
        keep = len(self.images) - dropped
        self.messages = self.messages[:n_messages]
        self.images, self._features = self.images[:keep], self._features[:keep]
        if dropped:
            slots = [i for i, t in enumerate(self._cached_ids) if t == self.model.image_token_id]
            first_dropped = keep * self.model.tokens_per_image
            if first_dropped < len(slots):
                self._cached_ids = self._cached_ids[: slots[first_dropped]]

    def restore(self, messages: list[dict], images: list) -> None:
        """Take up a saved conversation: `messages` (a system prompt first or not; user turns with their image
        placeholders; each assistant reply), `images` (RGB, in placeholder order). The images are encoded now;
        the next turn prefills the whole history once, then turns go on as usual."""
        encoded = self.model.processor.encode(messages, images, labels=False)  # checks placeholders and lengths
        features = image_features(self.model, encoded)  # (n_img, N_img, D_llm) or None
        self.reset()
        self.messages, self.images = [dict(m) for m in messages], list(images)
        self._features = [] if features is None else list(features)
        self.system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None

    def last_user_index(self) -> int:
        """Index in `messages` of the last user turn (what regenerate / edit / undo act on)."""
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i]["role"] == "user":
                return i
        raise MessageError("there is no message in this conversation yet")

    def send(
        self,
        text: str,
        images: list | None = None,
        gen: GenerationConfig | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Add a user turn (text + optional images, placed before the text) and stream the reply."""
        images = list(images or [])
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        # Validate everything before the conversation changes, so a bad turn leaves no trace.
        candidate = self.messages + [{"role": "user", "content": content}]
        encoded = self.model.processor.encode(candidate, self.images + images, add_generation_prompt=True, labels=False)
        new = image_features(self.model, encoded, first=len(self.images))  # (n_new, N_img, D_llm) or None
        new_features = [] if new is None else list(new)
        self.messages, self.images = candidate, self.images + images
        self._features.extend(new_features)
        return self._reply(encoded.input_ids.tolist(), gen or self.gen, cancel)

    def _reply(self, ids: list[int], gen: GenerationConfig, cancel: threading.Event | None) -> Iterator[str]:
        image_id = self.model.image_token_id
        keep = _common_prefix(self._cached_ids, ids)
        keep = min(keep, len(ids) - 1)  # at least one token must be prefilled to get logits
        # Never split an image's span: its keys depend on the whole image's features.
        while 0 < keep < len(ids) and ids[keep] == image_id and ids[keep - 1] == image_id:
            keep -= 1
        surplus = self._cache.get_seq_length() - keep
        if surplus > 0:
            self._cache.crop(-surplus)  # transformers' crop takes the number of tokens to drop, negated
        self._cached_ids = ids[:keep]
        first_image = sum(1 for t in ids[:keep] if t == image_id) // self.model.tokens_per_image
        pending = self._features[first_image:]
        features = torch.stack(pending) if pending else None
        self.last_prefill_tokens = len(ids) - keep
        new_ids = torch.tensor(ids[keep:], dtype=torch.long)
        reply = Reply(self.model, new_ids, gen, self._cache, self._cached_ids, features, cancel, self.batcher)
        try:
            yield from reply
        finally:
            # Whatever happened (done, cancelled, caller stopped reading), the cache length says
            # exactly which of prompt + generated tokens have keys/values.
            self._cached_ids = (ids + reply.ids)[: self._cache.get_seq_length()]
            self.messages.append({"role": "assistant", "content": self.model.processor.decode(reply.ids)})

    def ask(self, text: str, images: list | None = None, **kwargs) -> str:
        return "".join(self.send(text, images, **kwargs))
