"""The llama.cpp backend: the LLM runs in llama.cpp (llama-cpp-python's low-level API), the engine local users
already trust; the vision tower and connector stay in torch and hand their output over as input embeddings.

One llama.cpp context serves every sequence: each cache is a llama.cpp sequence id (`SeqCache`) in one
unified KV store, a prompt chunk goes in as a batch of embeddings (`llama_batch_init(n, n_embd, 1)`: the
token embeddings and the image features of the prompt, as llama.cpp's own multimodal helper feeds its
images), and a decode step is one `llama_decode` with one token row per running sequence, each at its own
position. Copying a prefix (the prefix cache) is `llama_memory_seq_cp`, which shares the KV cells instead
of copying them; dropping a sequence's tail (a session's rollback) is `llama_memory_seq_rm`.

The LLM's weights come as GGUF, written once and cached (`mllm.gguf_convert`); a LoRA adapter is written as
a GGUF LoRA adapter and applied at run time: merged into a 4-bit base, its effect would be lost in the
rounding.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import torch

from mllm.errors import CheckpointError, MLLMError

# KV cells of the one store every sequence shares (running replies, sessions, the prefix cache's entries):
# 23 KB a token for the default model in f16, so 16,384 cells take ~370 MB. When it is full, the backend's
# `reclaimers` (the prefix cache's least recently used entries) give cells back before a decode fails.
KV_TOKENS = 16384
# Sequence ids: every live cache holds one (llama.cpp allows up to 256 in one context).
MAX_SEQUENCES = 256
BATCH_ROWS = 512  # the most rows one llama_decode takes (a packed prefill is split past it)
# The GGUF type of the LLM's weights unless asked otherwise (measured: scripts/bench_infer.py, README).
DEFAULT_TYPE = "q8_0"


class LlamaCppError(MLLMError):
    code = "server_error"


def installed() -> bool:
    """Whether llama-cpp-python can be imported (without importing it: that loads the native library)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _binding():
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - a dependency; its absence is an install problem
        raise CheckpointError(
            "backend 'llamacpp' needs llama-cpp-python (make install builds it); or choose --backend int4"
        ) from e
    return llama_cpp


class SeqCache:
    """One sequence's KV in the shared llama.cpp context: `seq` its id, `n` its positions. Freed (its cells
    cleared, its id returned) when nothing refers to it any more."""

    def __init__(self, backend: LlamaCppBackend, seq: int, n: int = 0):
        self.backend, self.seq, self.n = backend, seq, n
        weakref.finalize(self, backend._forget, seq)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.n

    def crop(self, max_length: int) -> None:
        """transformers' `crop`: a negative `max_length` drops that many positions from the end."""
        keep = self.n + max_length if max_length < 0 else min(max_length, self.n)
        self.backend._remove(self.seq, keep)
        self.n = keep


class LlamaCppBackend:
    """`mllm.backends.Backend` over one llama.cpp context."""

    name = "llamacpp"

    def __init__(
        self,
        gguf: str | Path,
        adapter: str | Path | None = None,
        kv_tokens: int = KV_TOKENS,
        threads: int | None = None,
    ):
        lc = self.lc = _binding()
        _quiet(lc)
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        params.use_mmap = True  # the weights stay in the page cache: nothing is converted at start
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), params)
        if not self.model:
            raise CheckpointError(f"{gguf}: llama.cpp could not load it; delete it to have it written again")
        context = lc.llama_context_default_params()
        context.n_ctx = kv_tokens
        context.n_batch = context.n_ubatch = BATCH_ROWS
        context.n_seq_max = MAX_SEQUENCES
        context.kv_unified = True  # one pool of cells for all sequences, not n_ctx / n_seq_max each
        threads = threads or torch.get_num_threads() or os.cpu_count() or 1
        context.n_threads = context.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, context)
        if not self.ctx:
            raise CheckpointError(f"llama.cpp could not make a context of {kv_tokens} tokens for {gguf}")
        self.memory = lc.llama_get_memory(self.ctx)
        self.vocab_size = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.width = lc.llama_model_n_embd(self.model)
        self.adapter = None
        if adapter is not None:
            self.adapter = lc.llama_adapter_lora_init(self.model, str(adapter).encode())
            if not self.adapter:
                raise CheckpointError(f"{adapter}: llama.cpp could not load this LoRA adapter")
            _set_adapter(lc, self.ctx, self.adapter)
        self.prefill_forwards = 0
        self.reclaimers: list = []  # weak references to callables that free some caches and say whether they did
        self._free = list(range(MAX_SEQUENCES - 1, -1, -1))
        self._forgotten: list[int] = []  # ids of caches collected on any thread, cleared on the model thread
        self._lock = threading.Lock()
        weakref.finalize(self, _close, lc, self.ctx, self.model)

    @classmethod
    def for_model(
        cls,
        model,
        adapter: str | Path | None = None,
        llm_weights: str | Path | None = None,
        gguf_type: str | None = None,
        **options,
    ) -> LlamaCppBackend:
        """The backend for `model`'s LLM: its GGUF (written once, cached) and its LoRA adapter as a GGUF adapter.
        The built-in SmolLM2 starts from the GGUF its package ships (re-quantized when `gguf_type` asks for
        another type); any other LLaMA-class LLM (a directory, a hub id's snapshot, a fully-tuned `llm/`) is
        converted by `mllm.gguf_convert`."""
        from mllm.config import SMOLLM2
        from mllm.gguf_convert import cached_gguf, cached_lora_gguf, cached_requantized
        from mllm.llm import SMOLLM2_GGUF, cache_root, resolve_llm_path, smollm2_gguf_dir

        gguf_type = gguf_type or DEFAULT_TYPE
        cache = cache_root() / "gguf"
        base_dir = Path(llm_weights) if llm_weights is not None else Path(resolve_llm_path(model.config.llm.path))
        if llm_weights is None and model.config.llm.path == SMOLLM2:
            shipped = smollm2_gguf_dir() / SMOLLM2_GGUF
            gguf = shipped if gguf_type == "q4_1" else cached_requantized(shipped, gguf_type, cache)
        else:
            gguf = cached_gguf(base_dir, gguf_type, cache)
        lora = cached_lora_gguf(adapter, base_dir, cache) if adapter is not None else None
        return cls(gguf, lora, **options)

    # ---- caches ---------------------------------------------------------------------------------
    def new_cache(self) -> SeqCache:
        self._clear_forgotten()
        if not self._free:
            self._reclaim()
        with self._lock:
            if not self._free:
                raise LlamaCppError(
                    f"all {MAX_SEQUENCES} llama.cpp sequences are in use (replies, sessions and cached prefixes); "
                    "wait for replies to finish or lower --prefix-cache-mib"
                )
            seq = self._free.pop()
        return SeqCache(self, seq)

    def copy(self, cache: SeqCache, length: int) -> SeqCache:
        copied = self.new_cache()
        self.lc.llama_memory_seq_cp(self.memory, cache.seq, copied.seq, 0, length)  # shares the cells
        copied.n = length
        return copied

    def nbytes(self, cache: SeqCache) -> int:
        return cache.n * self.bytes_per_token

    @property
    def bytes_per_token(self) -> int:
        lc = self.lc
        layers, heads = lc.llama_model_n_layer(self.model), lc.llama_model_n_head(self.model)
        kv_heads = lc.llama_model_n_head_kv(self.model)
        return layers * 2 * kv_heads * (self.width // heads) * 2  # keys and values, f16

    def release(self, cache: SeqCache) -> None:
        """Nothing to write back: a sequence's keys / values live in the shared store while it runs."""

    def _remove(self, seq: int, keep: int) -> None:
        self.lc.llama_memory_seq_rm(self.memory, seq, keep, -1)

    def _reclaim(self) -> bool:
        """Ask the reclaimers to free caches; True if any did (their cells and ids are free again)."""
        freed = any((reclaim := ref()) is not None and reclaim() for ref in self.reclaimers)
        import gc

        gc.collect()  # a freed cache inside a reference cycle: its finalizer runs now
        self._clear_forgotten()
        return freed

    def _forget(self, seq: int) -> None:
        with self._lock:  # may run on any thread (garbage collection): cleared later on the model thread
            self._forgotten.append(seq)

    def _clear_forgotten(self) -> None:
        with self._lock:
            forgotten, self._forgotten = self._forgotten, []
        for seq in forgotten:
            self.lc.llama_memory_seq_rm(self.memory, seq, 0, -1)
        with self._lock:
            self._free.extend(forgotten)

    # ---- forwards -------------------------------------------------------------------------------
    def prefill(self, caches: list, chunks: list[torch.Tensor]) -> torch.Tensor:
        """Every chunk's rows in as few `llama_decode` calls as BATCH_ROWS allows (the weights read once for
        all of them), each row in its own sequence at its own position; the logits after each chunk (S, V)."""
        self._clear_forgotten()
        rows = []  # (cache, position, embedding row index into `embeds`, wants logits)
        embeds = torch.cat([chunk.detach().float() for chunk in chunks]).numpy()  # (T, D)
        index = 0
        for cache, chunk in zip(caches, chunks):
            for k in range(chunk.shape[0]):
                rows.append((cache, cache.n + k, index, k == chunk.shape[0] - 1))
                index += 1
        logits = []
        for start in range(0, len(rows), BATCH_ROWS):
            part = rows[start : start + BATCH_ROWS]
            logits.append(self._decode(part, embeds=embeds[part[0][2] : part[-1][2] + 1]))
            self.prefill_forwards += 1
        for cache, chunk in zip(caches, chunks):
            cache.n += chunk.shape[0]
        return torch.cat(logits)  # (S, V): one row per chunk, in order

    def step(self, tokens: list[int], caches: list, exact: bool = False) -> torch.Tensor:
        """One token for each sequence in one `llama_decode`: (B, V). Rows of a llama.cpp batch are computed
        alike whatever else is in it, so `exact` changes nothing here."""
        self._clear_forgotten()
        rows = [(cache, cache.n, token, True) for cache, token in zip(caches, tokens)]
        logits = self._decode(rows, tokens=tokens)
        for cache in caches:
            cache.n += 1
        return logits

    def _decode(self, rows: list, embeds: np.ndarray | None = None, tokens: list[int] | None = None) -> torch.Tensor:
        lc, n = self.lc, len(rows)
        batch = lc.llama_batch_init(n, self.width if embeds is not None else 0, 1)
        try:
            batch.n_tokens = n
            if embeds is not None:
                data = np.ascontiguousarray(embeds, dtype=np.float32)  # (n, D)
                ctypes.memmove(batch.embd, data.ctypes.data, data.nbytes)
            for i, (cache, position, item, wants) in enumerate(rows):
                if tokens is not None:
                    batch.token[i] = item
                batch.pos[i] = position
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = cache.seq
                batch.logits[i] = wants
            status = lc.llama_decode(self.ctx, batch)
            while status == 1 and self._reclaim():  # no KV cells left: cached prefixes give theirs back
                status = lc.llama_decode(self.ctx, batch)
            if status != 0:
                raise LlamaCppError(
                    f"llama.cpp could not decode (status {status}: its KV store of {KV_TOKENS} tokens is full); "
                    "lower --prefix-cache-mib or the number of concurrent replies"
                )
            wanted = [i for i, row in enumerate(rows) if row[3]]
            out = np.empty((len(wanted), self.vocab_size), dtype=np.float32)
            for j, i in enumerate(wanted):
                out[j] = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, i), shape=(self.vocab_size,))
            return torch.from_numpy(out)  # (rows wanting logits, V)
        finally:
            lc.llama_batch_free(batch)


_LOG_CALLBACK = None
GGML_LOG_LEVEL_ERROR = 4


def _quiet(lc):
    """llama.cpp logs every tensor and setting it loads to stderr: keep its errors only. Returns the callback (for
    the libraries that log apart, as mtmd does)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:

        def log(level, text, _data) -> None:
            if level == GGML_LOG_LEVEL_ERROR:
                print(f"llama.cpp: {text.decode(errors='replace').rstrip()}", file=sys.stderr)

        _LOG_CALLBACK = lc.llama_log_callback(log)  # kept: the C side holds only a pointer to it
        lc.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    return _LOG_CALLBACK


def _set_adapter(lc, ctx, adapter) -> None:
    if hasattr(lc, "llama_set_adapter_lora"):
        if lc.llama_set_adapter_lora(ctx, adapter, 1.0) != 0:
            raise CheckpointError("llama.cpp refused the LoRA adapter for this model")
        return
    adapters = (lc.llama_adapter_lora_p * 1)(adapter)
    scales = (ctypes.c_float * 1)(1.0)
    if lc.llama_set_adapters_lora(ctx, adapters, 1, scales) != 0:
        raise CheckpointError("llama.cpp refused the LoRA adapter for this model")


def _close(lc, ctx, model) -> None:
    lc.llama_free(ctx)
    lc.llama_model_free(model)
