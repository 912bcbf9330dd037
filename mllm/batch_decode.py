"""A batched decode step through transformers' own forward, for the models the int4 forward does not take.

On CUDA, in full precision or with bitsandbytes 4-bit / 8-bit weights, the LLM runs as transformers runs
it. `TransformersBatch.step` still decodes the running sequences together: their keys / values sit side by
side in a `mllm.batch_kv.BatchKV` (copied in when a sequence joins, written back when it leaves, as for
the int4 forward), and one forward of the LLM takes one token per sequence, (B, 1), with each row's own
position and a mask that shows each row its own positions only. One forward instead of B keeps a GPU busy
with B rows for the price of about one, where a loop over the sequences would pay B launches per layer.

It takes the architectures whose attention layers only read the cache through `update` and whose forward
uses a ready 4D mask as it is (LLaMA, Mistral, Qwen2 without a sliding window), and not LLM.int8()
weights (8-bit with outlier columns, where rows interfere); `for_model` returns None for others, which
decode one sequence at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from mllm.batch_kv import BatchKV, in_given_order, in_slot_order
from mllm.int4_decode import ARCHITECTURES


class _BatchCache:
    """What the LLM's attention layers see during a batched step: `update` stores each row's new key / value
    in the batch buffer and returns the batch's keys / values so far (B, KV, L, hd)."""

    def __init__(self, batch: BatchKV):
        self.batch = batch

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.batch.write(layer_idx, keys[:, :, 0], values[:, :, 0])  # (B, KV, 1, hd) in

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.batch.lengths, default=0)


class TransformersBatch:
    """`step(tokens, caches) -> logits (B, V)`: one token appended to each sequence's `DynamicCache`, one
    forward of `llm` for all of them."""

    def __init__(self, llm: nn.Module):
        self.llm = llm
        self.batch: BatchKV | None = None  # made at the first step, with the caches' dtype and device

    @classmethod
    def for_model(cls, llm: nn.Module) -> TransformersBatch | None:
        base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm  # under a LoRA adapter (peft)
        config = getattr(base, "config", None)
        if type(base).__name__ not in ARCHITECTURES or config is None:
            return None
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            return None  # a 4D mask given as it is would let every layer see past the window
        if any(type(m).__name__ == "Linear8bitLt" and m.state.threshold > 0 for m in base.modules()):
            # LLM.int8(): the input columns computed in 16-bit are those where any row of the batch has an
            # outlier, so a row's result depends on the rows beside it (9% of the logits' scale on the
            # default model); each reply decodes alone, as it would with nothing else running.
            return None
        return cls(llm)

    @property
    def rows(self) -> list:
        return self.batch.rows if self.batch is not None else []

    @torch.inference_mode()
    def step(self, tokens: list[int], caches: list) -> torch.Tensor:
        if self.batch is None:
            keys = caches[0].layers[0].keys  # (1, KV, T, hd)
            self.batch = BatchKV(len(caches[0].layers), keys.shape[1], keys.shape[-1], keys.dtype, keys.device)
        slots = self.batch.arrange(caches)  # the batch's rows are slots 0..B-1
        positions, visible = self.batch.begin_step()  # (B,), (B, 1, 1, L)
        # Additive, in the cache's dtype: what eager attention adds and SDPA takes alike.
        mask = torch.zeros(visible.shape, dtype=self.batch.dtype, device=self.batch.device)
        mask.masked_fill_(~visible, torch.finfo(self.batch.dtype).min)
        out = self.llm(
            input_ids=torch.tensor(in_slot_order(tokens, slots), device=self.batch.device)[:, None],  # (B, 1)
            position_ids=positions[:, None],  # (B, 1): each row at its own position
            attention_mask=mask,
            cache=_BatchCache(self.batch),
            use_cache=True,
        )
        self.batch.advance()
        return in_given_order(out.logits[:, -1], slots)  # (B, V), back in the order given

    def release(self, cache) -> None:
        """`cache` leaves the batch: its keys / values so far are written back into it."""
        if self.batch is not None:
            self.batch.release(cache)


def transformers_batch(llm: nn.Module) -> TransformersBatch | None:
    """`TransformersBatch.for_model(llm)`, built once per model (kept on it, outside its modules)."""
    if "_transformers_batch" not in llm.__dict__:
        llm.__dict__["_transformers_batch"] = TransformersBatch.for_model(llm)
    return llm.__dict__["_transformers_batch"]
