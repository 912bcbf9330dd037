"""What the stateless API would otherwise compute again: the KV of a conversation's prefix, an image's features.

An OpenAI client re-sends the whole history with every turn. `PrefixCache` keeps the KV caches of recent
prompts (and their replies) in a pool bounded in bytes, least recently used out first; a request that
shares a prefix with one of them prefills only the rest. A prefix is its token ids with every image slot
standing for a hash of that image's pixels, so a changed image in an otherwise identical prompt is a
miss from that image on. `FeatureCache` keeps image features by the same hash, so an image seen in an
earlier turn or another conversation is never encoded twice.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict

import torch

from mllm.generation import image_features
from mllm.processor import Encoded


def image_hash(image) -> str:
    """A PIL image's identity: its mode, size and pixels."""
    digest = hashlib.blake2b(f"{image.mode}{image.size}".encode(), digest_size=16)
    digest.update(image.tobytes())
    return digest.hexdigest()


def prefix_key(encoded: Encoded, image_token_id: int, hashes: list[str]) -> tuple:
    """`encoded`'s ids with each image slot replaced by (that image's hash, slot number)."""
    key, image, slot = [], -1, 0
    previous = None
    for token in encoded.input_ids.tolist():
        if token == image_token_id:
            if previous != image_token_id:
                image, slot = image + 1, 0
            key.append((hashes[image], slot))
            slot += 1
        else:
            key.append(token)
        previous = token
    return tuple(key)


class PrefixCache:
    """KV caches of earlier prompts (+ replies) by prefix key, at most `budget_bytes` of them in all. The caches
    are the model's decode backend's (`mllm.backends`), copied and sized by it."""

    def __init__(self, budget_bytes: int, backend):
        self.budget_bytes, self.backend = budget_bytes, backend
        self._entries: OrderedDict[tuple, tuple[object, int]] = OrderedDict()  # key -> (cache, bytes)
        self._lock = threading.Lock()
        self.hits = self.misses = self.reused_tokens = 0
        if hasattr(backend, "reclaimers"):  # a backend with a bounded KV store asks for room back
            backend.reclaimers.append(weakref.WeakMethod(self.evict_oldest))  # the backend outlives engines

    def evict_oldest(self) -> bool:
        """Drop the least recently used entry; False when there is none."""
        with self._lock:
            if not self._entries:
                return False
            self._entries.popitem(last=False)
            return True

    @property
    def used_bytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def lookup(self, key: tuple) -> tuple[object | None, int]:
        """A private copy of the cache with the longest shared prefix, cropped to it, and that length; at least
        the last position is left to prefill (its logits start the reply). (None, 0) on a miss."""
        best, best_len = None, 0
        with self._lock:
            for entry_key in self._entries:
                n = _common_prefix(entry_key, key, limit=len(key) - 1)
                if n > best_len:
                    best, best_len = entry_key, n
            if best is None:
                self.misses += 1
                return None, 0
            # Never stop inside an image: its features go in whole, so back off to its first slot.
            while best_len > 0 and isinstance(key[best_len], tuple) and key[best_len][1] > 0:
                best_len -= 1
            if best_len == 0:
                self.misses += 1
                return None, 0
            self._entries.move_to_end(best)
            pooled = self._entries[best][0]
            self.hits += 1
            self.reused_tokens += best_len
        return self.backend.copy(pooled, best_len), best_len

    def covered(self, key: tuple) -> int:
        """How many of `key`'s positions `lookup` would reuse at most (nothing copied, nothing counted)."""
        with self._lock:
            return max((_common_prefix(k, key, limit=len(key) - 1) for k in self._entries), default=0)

    def store(self, key: tuple, cache) -> None:
        """Keep `cache` (it holds exactly `key`'s positions) for later requests, evicting the least recently used
        entries to stay within the budget; one larger than the whole budget is not kept."""
        size = self.backend.nbytes(cache)
        if size > self.budget_bytes or not key:
            return
        with self._lock:
            # An entry this one extends says nothing the new one does not: drop it.
            for old in [k for k in self._entries if len(k) <= len(key) and key[: len(k)] == k]:
                del self._entries[old]
            self._entries[key] = (cache, size)
            while self.used_bytes > self.budget_bytes:
                self._entries.popitem(last=False)

    def stats(self) -> dict:
        with self._lock:
            return {
                "prefix_cache_entries": len(self._entries),
                "prefix_cache_mib": round(self.used_bytes / 2**20, 2),
                "prefix_cache_budget_mib": round(self.budget_bytes / 2**20, 2),
                "prefix_cache_hits": self.hits,
                "prefix_cache_misses": self.misses,
                "prefix_cache_reused_tokens": self.reused_tokens,
            }


class FeatureCache:
    """Image features (N_img, D_llm) by image hash (and, for a text-reading Q-Former, the instruction), LRU,
    at most `max_images` of them."""

    def __init__(self, max_images: int = 256):
        self.max_images = max_images
        self._features: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def features(self, model, encoded: Encoded, hashes: list[str], first: int = 0) -> torch.Tensor | None:
        """`mllm.generation.image_features(model, encoded, first)`, encoding only the images not seen before."""
        n = len(encoded.images)
        if n <= first:
            return None
        instructions = encoded.qformer_ids if model.processor.qformer_tokenizer is not None else [None] * n
        keys = [(hashes[i], None if instructions[i] is None else tuple(instructions[i])) for i in range(n)]
        with self._lock:
            missing = [i for i in range(first, n) if keys[i] not in self._features]
            self.hits += n - first - len(missing)
            self.misses += len(missing)
        if missing:  # encoded together, from the first unseen image on (the processor slices from there)
            computed = image_features(model, encoded, first=missing[0])  # (n - missing[0], N_img, D)
            with self._lock:
                for i in missing:
                    self._features[keys[i]] = computed[i - missing[0]]
                while len(self._features) > self.max_images:
                    self._features.popitem(last=False)
        with self._lock:
            for i in range(first, n):
                if keys[i] in self._features:
                    self._features.move_to_end(keys[i])
            return torch.stack([self._features[keys[i]] for i in range(first, n)])  # (n - first, N_img, D)

    def stats(self) -> dict:
        with self._lock:
            return {
                "feature_cache_images": len(self._features),
                "feature_cache_hits": self.hits,
                "feature_cache_misses": self.misses,
            }


def _common_prefix(a: tuple, b: tuple, limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
