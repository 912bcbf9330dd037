"""The keys and values of the sequences decoding together, side by side in one padded buffer per layer.

A batched decode step on the CPU is bound by calls: with each sequence in its own `DynamicCache`, every
layer costs two concatenations and one attention call per sequence (16 sequences x 30 layers = 1,440 small
calls a step). `BatchKV` holds the batch's keys / values as one `(slots, KV, capacity, hd)` tensor per
layer: a step writes every sequence's new position with one indexed store and attends with one masked call.

A sequence's `DynamicCache` is copied in when it joins (`arrange`) and written back when it leaves
(`release`), so everything else (prefill, the prefix cache, a chat session's next turn) keeps using
transformers' cache class. Slots are kept dense: a leaving sequence's slot takes the last slot's row, so
the batch is always rows `0..B-1` and attention never computes an empty row.
"""

from __future__ import annotations

import torch

CAPACITY_STEP = 256  # positions added when a sequence outgrows the buffer (one re-allocation per 256 tokens)


def in_slot_order(tokens: list[int], slots: list[int]) -> list[int]:
    """`tokens` given in the callers' order, rearranged so item s belongs to slot s (`arrange`'s slots)."""
    by_slot = [0] * len(tokens)
    for token, slot in zip(tokens, slots):
        by_slot[slot] = token
    return by_slot


def in_given_order(rows: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """Per-slot results (B, ...) back in the order the caches were given; the usual case costs nothing."""
    return rows if slots == list(range(len(slots))) else rows[torch.tensor(slots, device=rows.device)]


class BatchKV:
    """`(S, KV, C, hd)` keys and values per layer for the caches in `rows` (slot order) and their lengths."""

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ):
        self.layers, self.kv_heads, self.head_dim, self.dtype = layers, kv_heads, head_dim, dtype
        self.device = torch.device(device)
        self.keys: list[torch.Tensor] = []  # per layer (S, KV, C, hd); empty while no sequence is resident
        self.values: list[torch.Tensor] = []
        self.rows: list = []  # the resident caches, row s in slot s
        self.lengths: list[int] = []  # positions filled per slot

    def __contains__(self, cache) -> bool:
        return any(row is cache for row in self.rows)

    def slot(self, cache) -> int:
        return next(s for s, row in enumerate(self.rows) if row is cache)

    def arrange(self, caches: list) -> list[int]:
        """Make the residents exactly `caches` (writing back the others, copying in the new ones), with room
        for one more position each; the slot of each cache, in the order given."""
        for cache in [row for row in self.rows if not any(row is c for c in caches)]:
            self.release(cache)
        joining = [cache for cache in caches if cache not in self]
        needed = max([n + 1 for n in self.lengths] + [c.get_seq_length() + 1 for c in joining])
        self._reserve(len(self.rows) + len(joining), needed)
        for cache in joining:
            self._admit(cache)
        return [self.slot(cache) for cache in caches]

    def release(self, cache) -> None:
        """Write `cache`'s keys / values back into it and free its slot (the last row moves into it)."""
        if cache not in self:
            return
        s, last = self.slot(cache), len(self.rows) - 1
        n = self.lengths[s]
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            cache.layers[layer].keys = keys[s : s + 1, :, :n].clone()  # (1, KV, n, hd): its own storage
            cache.layers[layer].values = values[s : s + 1, :, :n].clone()
            if s != last:
                keys[s] = keys[last]
                values[s] = values[last]
        self.rows[s], self.lengths[s] = self.rows[last], self.lengths[last]
        self.rows.pop()
        self.lengths.pop()
        if not self.rows:  # an idle server holds no batch buffers
            self.keys, self.values = [], []

    def begin_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's positions, where each row's new key goes (B,), and what each row attends to once it is
        written (B, 1, 1, L), L = the longest row's new length; computed once, every layer's `write` uses them."""
        self._positions = torch.tensor(self.lengths, device=self.device)
        self._rows = torch.arange(len(self.lengths), device=self.device)
        self._span = max(self.lengths) + 1
        visible = torch.arange(self._span, device=self.device)[None] <= self._positions[:, None]  # (B, L)
        return self._positions, visible[:, None, None]

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one new position per row (rows `0..B-1`, `keys` / `values` (B, KV, hd)) at the positions
        `begin_step` gave; the rows' keys / values so far, (B, KV, L, hd) views."""
        self.keys[layer][self._rows, :, self._positions] = keys
        self.values[layer][self._rows, :, self._positions] = values
        b = keys.shape[0]
        return self.keys[layer][:b, :, : self._span], self.values[layer][:b, :, : self._span]

    def advance(self) -> None:
        """Every row got one position (after the step's last layer)."""
        self.lengths = [n + 1 for n in self.lengths]

    def _admit(self, cache) -> None:
        s, n = len(self.rows), cache.get_seq_length()
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            keys[s, :, :n] = cache.layers[layer].keys[0]
            values[s, :, :n] = cache.layers[layer].values[0]
        self.rows.append(cache)
        self.lengths.append(n)

    def _reserve(self, slots: int, positions: int) -> None:
        """Grow the buffers (copying what they hold) to at least `slots` rows of `positions` positions."""
        if self.keys:
            have_slots, _, have_positions, _ = self.keys[0].shape
            if slots <= have_slots and positions <= have_positions:
                return
            slots, positions = max(slots, 2 * have_slots), max(positions, have_positions)
        positions = -(-positions // CAPACITY_STEP) * CAPACITY_STEP
        grown_keys, grown_values = [], []
        for layer in range(self.layers):
            shape = (slots, self.kv_heads, positions, self.head_dim)
            keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
            values = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self.keys:
                old = self.keys[layer]
                keys[: old.shape[0], :, : old.shape[2]] = old
                values[: old.shape[0], :, : old.shape[2]] = self.values[layer]
            grown_keys.append(keys)
            grown_values.append(values)
        self.keys, self.values = grown_keys, grown_values
