"""An exported LLM GGUF + mmproj GGUF answering in llama.cpp's own multimodal library (mtmd), the code path
llama-server, llama-mtmd-cli and Ollama's llama.cpp runner take: `mtmd_tokenize` splits the prompt at the media
marker and turns the image into its chunk (clip's preprocessing and tower, the projector),
`mtmd_helper_eval_chunks` decodes text and image chunks, then tokens are decoded greedily one by one.

Images go in as RGB bytes: `mtmd_bitmap_init(nx, ny, rgb)` takes a width x height x 3 uint8 buffer, the bitmap
mtmd's own file helpers (`mtmd_helper_bitmap_init_from_buf`) make after decoding. The caller decodes with mllm's
image loader (its format allow-list and size limits) and can hand over exactly the pixels mllm's tower saw.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mllm.backends.llamacpp import _binding, _quiet
from mllm.errors import CheckpointError

CONTEXT = 4096
BATCH = 512


@dataclass
class Answer:
    """One greedy answer: its prompt as llama.cpp tokenized it, the answer's tokens, the logits before the first."""

    prompt_tokens: list[int]  # text tokens in order, the image's place marked by -1 per image token
    tokens: list[int]
    first_logits: np.ndarray  # (n_vocab,) float32


def available() -> bool:
    """Whether llama-cpp-python with its multimodal binding is installed (found, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    return spec is not None and spec.origin is not None and (Path(spec.origin).parent / "mtmd_cpp.py").is_file()


def marker() -> str:
    """The text that stands for an image in a prompt mtmd tokenizes (`<__media__>`)."""
    _binding()
    from llama_cpp import mtmd_cpp

    return mtmd_cpp.mtmd_default_marker().decode()


class MtmdRunner:
    """The LLM GGUF in a llama.cpp context and the mmproj in an mtmd context on top of it, with llama.cpp's
    default settings (what its server runs), CPU only."""

    def __init__(self, llm_gguf: str | Path, mmproj: str | Path, threads: int | None = None):
        lc = self.lc = _binding()
        from llama_cpp import mtmd_cpp

        self.mt = mtmd_cpp
        log = _quiet(lc)  # llama.cpp's log down to errors; mtmd and its helpers log through the same callback
        mtmd_cpp.mtmd_log_set(log, ctypes.c_void_p(0))
        mtmd_cpp.mtmd_helper_log_set(log, ctypes.c_void_p(0))
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(str(llm_gguf).encode(), params)
        if not self.model:
            raise CheckpointError(f"{llm_gguf}: llama.cpp could not load this LLM GGUF")
        threads = threads or min(4, os.cpu_count() or 1)
        context = lc.llama_context_default_params()
        context.n_ctx = CONTEXT
        context.n_batch = context.n_ubatch = BATCH
        context.n_threads = context.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, context)
        if not self.ctx:
            raise CheckpointError(f"llama.cpp could not make a context for {llm_gguf}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        mparams = mtmd_cpp.mtmd_context_params_default()
        mparams.use_gpu = False
        mparams.print_timings = False
        mparams.warmup = False
        mparams.n_threads = threads
        self.mctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), self.model, mparams)
        if not self.mctx:
            self.close()
            raise CheckpointError(f"{mmproj}: llama.cpp's multimodal library could not load this mmproj")

    def answer(self, prompt: str, images: list[np.ndarray], max_new_tokens: int, stops: set[int]) -> Answer:
        """Greedy answer to `prompt` (one `marker()` per image) with `images` ((H, W, 3) uint8 each)."""
        lc, mt = self.lc, self.mt
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        bitmaps = [self._bitmap(image) for image in images]
        chunks = mt.mtmd_input_chunks_init()
        try:
            data = prompt.encode()
            text = mt.mtmd_input_text(data, len(data), True, True)  # add_special as the server does; parse special
            array = (mt.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            if (status := mt.mtmd_tokenize(self.mctx, chunks, ctypes.byref(text), array, len(bitmaps))) != 0:
                raise CheckpointError(f"mtmd_tokenize failed (status {status}): the prompt and images disagree")
            prompt_tokens = self._prompt_tokens(chunks)
            n_past = lc.llama_pos(0)
            if mt.mtmd_helper_eval_chunks(self.mctx, self.ctx, chunks, 0, 0, BATCH, True, ctypes.byref(n_past)):
                raise CheckpointError("llama.cpp could not evaluate the prompt (mtmd_helper_eval_chunks failed)")
        finally:
            mt.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mt.mtmd_bitmap_free(bitmap)
        first = self._logits()
        tokens, logits, position = [], first, n_past.value
        while len(tokens) < max_new_tokens:
            token = int(np.argmax(logits))
            if token in stops or lc.llama_vocab_is_eog(self.vocab, token):
                break
            tokens.append(token)
            logits = self._step(token, position)
            position += 1
        return Answer(prompt_tokens, tokens, first)

    def image_embeddings(self, image: np.ndarray) -> np.ndarray:
        """What mtmd hands the LLM for one image (clip's preprocessing, tower and projector): (N_img, D_llm)."""
        mt = self.mt
        bitmap = self._bitmap(image)
        chunks = mt.mtmd_input_chunks_init()
        try:
            data = marker().encode()
            text = mt.mtmd_input_text(data, len(data), False, True)
            array = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mt.mtmd_tokenize(self.mctx, chunks, ctypes.byref(text), array, 1) != 0:
                raise CheckpointError("mtmd_tokenize failed on a lone image")
            for i in range(mt.mtmd_input_chunks_size(chunks)):
                chunk = mt.mtmd_input_chunks_get(chunks, i)
                if mt.mtmd_input_chunk_get_type(chunk) == mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    if mt.mtmd_encode_chunk(self.mctx, chunk) != 0:
                        raise CheckpointError("mtmd could not encode the image")
                    n = mt.mtmd_input_chunk_get_n_tokens(chunk)
                    width = self.lc.llama_model_n_embd(self.model)
                    out = mt.mtmd_get_output_embd(self.mctx)
                    return np.ctypeslib.as_array(out, shape=(n * width,)).reshape(n, width).copy()
            raise CheckpointError("mtmd made no image chunk")
        finally:
            mt.mtmd_input_chunks_free(chunks)
            mt.mtmd_bitmap_free(bitmap)

    def _bitmap(self, image: np.ndarray):
        height, width, channels = image.shape
        if channels != 3 or image.dtype != np.uint8:
            raise ValueError(f"images go to mtmd as (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        rgb = np.ascontiguousarray(image)
        buffer = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bitmap = self.mt.mtmd_bitmap_init(width, height, buffer)  # copies the bytes
        if not bitmap:
            raise CheckpointError("mtmd_bitmap_init failed")
        return bitmap

    def _prompt_tokens(self, chunks) -> list[int]:
        mt, out = self.mt, []
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            chunk = mt.mtmd_input_chunks_get(chunks, i)
            if mt.mtmd_input_chunk_get_type(chunk) == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t(0)
                ids = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                out += [ids[k] for k in range(n.value)]
            else:
                out += [-1] * mt.mtmd_input_chunk_get_n_tokens(chunk)
        return out

    def _logits(self) -> np.ndarray:
        row = self.lc.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self.n_vocab,)).astype(np.float32)  # a copy

    def _step(self, token: int, position: int) -> np.ndarray:
        lc = self.lc
        batch = lc.llama_batch_init(1, 0, 1)
        try:
            batch.n_tokens = 1
            batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = token, position, 1, True
            batch.seq_id[0][0] = 0
            if lc.llama_decode(self.ctx, batch) != 0:
                raise CheckpointError("llama.cpp could not decode the answer (llama_decode failed)")
        finally:
            lc.llama_batch_free(batch)
        return self._logits()

    def close(self) -> None:
        if getattr(self, "mctx", None):
            self.mt.mtmd_free(self.mctx)
            self.mctx = None
        if getattr(self, "ctx", None):
            self.lc.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.lc.llama_model_free(self.model)
            self.model = None
