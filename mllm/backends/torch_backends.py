"""The torch backends: the int4 CPU forward (`mllm.int4_decode`) and transformers' own forward
(`mllm.batch_decode`). Both keep each sequence's keys / values in a transformers `DynamicCache`."""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from mllm.batch_decode import transformers_batch
from mllm.int4_decode import DENSE_ROWS, Int4Decoder, int4_decoder


class _TorchCaches:
    """What both torch backends do alike with a `DynamicCache`."""

    def __init__(self, model):
        self.model, self.prefill_forwards = model, 0

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.llm.config)

    def copy(self, cache: DynamicCache, length: int) -> DynamicCache:
        """The first `length` positions in storage of the copy's own (the pooled cache stays as it is).

        Plain layers are copied tensor by tensor (0.8 ms for 150 positions of the default model, where a
        deepcopy of the whole cache object takes 6); any other layer kind (sliding windows) goes through
        deepcopy + crop."""
        if all(type(layer) is DynamicLayer for layer in cache.layers):
            copied = DynamicCache()
            for index, layer in enumerate(cache.layers):  # (1, KV, T, hd) -> (1, KV, length, hd)
                # update concatenates onto the empty new layer: the slices land in storage of the copy's own.
                copied.update(layer.keys[:, :, :length], layer.values[:, :, :length], index)
            return copied
        copied = copy.deepcopy(cache)
        if (surplus := copied.get_seq_length() - length) > 0:
            copied.crop(-surplus)  # transformers' crop takes the number of tokens to drop, negated
        return copied

    def nbytes(self, cache: DynamicCache) -> int:
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


class Int4Backend(_TorchCaches):
    """An int4-quantized LLaMA-class LLM through `Int4Decoder`: prompt chunks of DENSE_ROWS rows or more
    through its bf16 copy (chunks waiting together in one packed forward), decode steps batched."""

    name = "int4"

    def __init__(self, model, decoder: Int4Decoder):
        super().__init__(model)
        self.decoder = decoder

    @classmethod
    def for_model(cls, model) -> Int4Backend | None:
        decoder = int4_decoder(model.llm)  # one per LLM: it holds the bf16 copy and the batch's keys / values
        return None if decoder is None else cls(model, decoder)

    @torch.inference_mode()
    def prefill(self, caches: list, chunks: list[torch.Tensor]) -> torch.Tensor:
        """Chunks of DENSE_ROWS rows or more run packed (`Int4Decoder.forward_packed`: the same logits as one
        by one, the weights read once); a shorter chunk runs alone: alone it takes the int4 kernel, packed it
        would take the bf16 copy, and its logits would depend on what it was packed with."""
        packed = [i for i, chunk in enumerate(chunks) if chunk.shape[0] >= DENSE_ROWS]
        packed = packed if len(packed) > 1 else []
        logits: list[torch.Tensor | None] = [None] * len(chunks)
        for i, (cache, chunk) in enumerate(zip(caches, chunks)):
            if i not in packed:
                logits[i] = self.decoder.forward(chunk, cache)  # (1, V)
                self.prefill_forwards += 1
        if packed:
            together = self.decoder.forward_packed([chunks[i] for i in packed], [caches[i] for i in packed])
            self.prefill_forwards += 1
            for row, i in enumerate(packed):
                logits[i] = together[row : row + 1]
        return torch.cat(logits)  # (S, V)

    @torch.inference_mode()
    def step(self, tokens: list[int], caches: list, exact: bool = False) -> torch.Tensor:
        return self.decoder.step(tokens, caches, wide=not exact)  # (B, V)

    def release(self, cache) -> None:
        self.decoder.release(cache)


class TransformersBackend(_TorchCaches):
    """Any LLM as transformers runs it (CUDA, bitsandbytes, full precision). Decode steps are batched by
    `TransformersBatch` where its architecture allows, else run one sequence at a time."""

    name = "transformers"

    def __init__(self, model):
        super().__init__(model)
        self.batch = transformers_batch(model.llm)  # one per LLM, or None where rows would interfere

    @torch.inference_mode()
    def prefill(self, caches: list, chunks: list[torch.Tensor]) -> torch.Tensor:
        logits = []
        for cache, chunk in zip(caches, chunks):  # logits_to_keep=1: only the last position's are needed
            out = self.model.llm(inputs_embeds=chunk[None], cache=cache, use_cache=True, logits_to_keep=1)
            logits.append(out.logits[:, -1])
            self.prefill_forwards += 1
        return torch.cat(logits)  # (S, V)

    @torch.inference_mode()
    def step(self, tokens: list[int], caches: list, exact: bool = False) -> torch.Tensor:
        if self.batch is not None and (len(tokens) > 1 or self.batch.rows):
            return self.batch.step(tokens, caches)  # (B, V)
        logits = []
        for cache, token in zip(caches, tokens):
            ids = torch.tensor([[token]], device=self.model.device)
            logits.append(self.model.llm(input_ids=ids, cache=cache, use_cache=True).logits[:, -1])
        return torch.cat(logits)  # (B, V)

    def release(self, cache) -> None:
        if self.batch is not None:
            self.batch.release(cache)
