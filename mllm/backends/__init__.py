"""Decode backends: what runs the LLM once the prompt is embeddings. One interface, chosen once at load.

A backend prefills chunks of input embeddings (image features already in their slots) into per-sequence
KV caches, steps a batch of sequences by one token each, and releases / copies / sizes a sequence's cache.
`mllm.generation` (the decode loop) and `mllm.batching` (the server's one driver) only ever call these
methods on `model.backend`; nothing outside this package and the modules it wraps names a backend.

| name | runs | where |
|---|---|---|
| `llamacpp` | the LLM as GGUF in llama.cpp (LoRA as a GGUF adapter applied at run time) | CPU |
| `int4` | torch's int4 kernel through `mllm.int4_decode` (needs an `int4`-quantized LLM) | CPU |
| `transformers` | transformers' own forward, batched through `mllm.batch_decode` | CUDA, bitsandbytes, full precision |

`select(model, name)` builds the one a model carries (`auto`: int4 where the LLM is int4-quantized, else
transformers; `mllm.loading` picks llamacpp for CPU loads where the binding is installed).
"""

from __future__ import annotations

from typing import Protocol

import torch

BACKENDS = ("auto", "llamacpp", "int4", "transformers")
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")  # the LLM's weight types with the llamacpp backend
# The CPU's decode backend unless told otherwise, where it is installed (measured: scripts/bench_infer.py).
CPU_DEFAULT = "llamacpp"


class Backend(Protocol):
    """The decode interface. Caches are the backend's own objects (`new_cache`); each supports
    `get_seq_length()` and `crop(-n)` (drop the last n positions), as transformers' DynamicCache does."""

    name: str
    prefill_forwards: int
    """Forwards run by `prefill` so far (packing runs several chunks in one)."""

    def new_cache(self): ...

    def prefill(self, caches: list, chunks: list[torch.Tensor]) -> torch.Tensor:
        """Append chunk i (N_i, D) of input embeddings to caches[i]; the logits after each chunk (S, V)."""

    def step(self, tokens: list[int], caches: list, exact: bool = False) -> torch.Tensor:
        """Append tokens[i] to caches[i], all in one forward where the backend batches; logits (B, V).
        `exact`: each row bit for bit what it is alone, where the backend's fast path is not."""

    def release(self, cache) -> None:
        """`cache` leaves the running batch (its keys / values whole in it again)."""

    def copy(self, cache, length: int):
        """A cache of its own holding `cache`'s first `length` positions (the prefix cache)."""

    def nbytes(self, cache) -> int:
        """Memory `cache` holds."""


def select(model, name: str = "auto", **options) -> Backend:
    """The backend `name` for `model`'s LLM; a backend that cannot run it raises CheckpointError saying why."""
    from mllm.errors import CheckpointError

    if name not in BACKENDS:
        raise CheckpointError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if name == "llamacpp":
        from mllm.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend.for_model(model, **options)
    from mllm.backends.torch_backends import Int4Backend, TransformersBackend

    int4 = Int4Backend.for_model(model)
    if name == "int4" and int4 is None:
        raise CheckpointError("backend 'int4' needs an int4-quantized LLaMA-class LLM; load with quantization='int4'")
    if name in ("auto", "int4") and int4 is not None:
        return int4
    return TransformersBackend(model)


def choose(backend: str, quantization: str | None, device: str, cpu_quantization: str) -> dict:
    """`load_model`'s backend options: {"backend", "quantization" (the torch LLM's), "gguf_type"}. A combination
    that cannot work is a CheckpointError saying why. `cpu_quantization`: the torch LLM's on a CPU by default."""
    from mllm.backends.llamacpp import installed
    from mllm.errors import CheckpointError

    if backend not in BACKENDS:
        raise CheckpointError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "auto" and device == "cpu":
        if (quantization is None or quantization in GGUF_TYPES) and CPU_DEFAULT == "llamacpp" and installed():
            backend = "llamacpp"
        elif quantization is None:
            quantization = cpu_quantization
    if backend == "llamacpp":
        if device != "cpu":
            raise CheckpointError("backend 'llamacpp' runs on the CPU here; on CUDA use --backend transformers")
        if quantization is not None and quantization not in GGUF_TYPES:
            raise CheckpointError(f"with backend 'llamacpp', quantization is the GGUF type: {', '.join(GGUF_TYPES)}")
        return {"backend": backend, "quantization": None, "gguf_type": quantization}
    if quantization in GGUF_TYPES:
        raise CheckpointError(f"quantization {quantization!r} is a GGUF type: it goes with --backend llamacpp")
    if backend == "int4" and quantization is None:
        quantization = "int4"
    return {"backend": backend, "quantization": quantization}
