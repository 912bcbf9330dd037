"""LLaMA-class checkpoints and their LoRA adapters as GGUF files, the format llama.cpp runs.

The CPU engine runs the LLM in llama.cpp; the vision tower and the connector stay in torch and hand llama.cpp
input embeddings. This module writes what llama.cpp loads:

- `write_llm_gguf`: a transformers LlamaForCausalLM (or Mistral / Qwen2, same layers) directory -> one GGUF of
  llama.cpp's `llama` architecture: hyperparameters, tokenizer, chat template and weights (f32, f16, bf16,
  q8_0, q4_0 or q4_1).
- `write_lora_gguf`: a peft LoRA adapter -> a GGUF LoRA adapter that llama.cpp applies at run time.
- `requantize_gguf`: an existing GGUF (e.g. the shipped SmolLM2 Q4_1) with its weights re-quantized to
  another type, its metadata kept.
- `cached_gguf`, `cached_lora_gguf`, `cached_requantized`: each of the three once per source and type, under
  the cache (`<mllm.llm.cache_root()>/gguf`), found again on later calls.

Tokenizers: a byte-level BPE tokenizer.json (GPT-2, SmolLM2, LLaMA 3, Qwen2) becomes llama.cpp's "gpt2" vocabulary,
a sentencepiece tokenizer.model (LLaMA 2, Vicuna, Mistral) its "llama" one; anything else is refused by name.

The names of keys and tensors come from gguf-py's constants (`gguf.Keys`, `gguf.TENSOR_NAMES`): they are
llama.cpp's own. Two layout facts shape the conversion:

- GGUF lists a tensor's dimensions innermost first (ggml's `ne`); gguf-py's writer reverses numpy's shape, so
  a torch `(out_features, in_features)` weight is written as it is and read by llama.cpp as `ne = [in, out]`.
- transformers' LLaMA rotates each head's dimension j together with j + head_dim/2 ("rotate half"); llama.cpp's
  `llama` rope rotates neighbours 2j and 2j+1. The rows of q_proj / k_proj (their biases, and a LoRA's lora_B)
  are reordered so that pair j lands on rows 2j, 2j+1 (`rope_rows_interleaved`). q.k is unchanged when q and k
  are permuted alike, so nothing else changes.

Weights are read one tensor at a time and streamed into the file, so converting a 7B model needs the memory
of its largest tensor, not of the model. Every file is written under a temporary name and renamed into place:
a killed conversion never leaves a half-written GGUF at the target path.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import dequantize, quant_shape_to_byte_shape, quantize

from mllm.atomic import atomic_directory, fsync_directory, recover
from mllm.errors import CheckpointError

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]  # "llama"

#: ftype name -> (the type of the model's 2-D weights, the `general.file_type` llama.cpp reports).
FTYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
}
# 4-bit files keep the output projection in q8_0 (`tensor_qtype`).
_FOUR_BIT = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)
LORA_DTYPES = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16}

#: transformers `model_type`s whose decoder is LLaMA's (RMSNorm, rope, GQA attention, SwiGLU MLP): llama.cpp runs
#: them as `llama`. Qwen2 adds q/k/v biases, which llama.cpp's `llama` graph applies when the file has them.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

#: The file's name inside a `cached_gguf` directory.
CACHED_NAME = "model.gguf"
# Bumped when the converter's output changes, so that `cached_gguf` never returns a file an older one wrote.
_CONVERTER_VERSION = 1


def _check_ftype(ftype: str) -> None:
    if ftype not in FTYPES:
        raise CheckpointError(f"GGUF type {ftype!r} is not supported; use one of {', '.join(FTYPES)}")


def _name(tensor: gguf.MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    base = gguf.TENSOR_NAMES[tensor]
    return f"{base.format(bid=layer) if layer is not None else base}.{suffix}"


# transformers module name (inside `model.layers.N.`) -> llama.cpp tensor.
_LAYER_MODULES = {
    "input_layernorm": gguf.MODEL_TENSOR.ATTN_NORM,
    "self_attn.q_proj": gguf.MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj": gguf.MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": gguf.MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj": gguf.MODEL_TENSOR.ATTN_OUT,
    "post_attention_layernorm": gguf.MODEL_TENSOR.FFN_NORM,
    "mlp.gate_proj": gguf.MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": gguf.MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": gguf.MODEL_TENSOR.FFN_DOWN,
}
_TOP_MODULES = {
    "model.embed_tokens": gguf.MODEL_TENSOR.TOKEN_EMBD,
    "model.norm": gguf.MODEL_TENSOR.OUTPUT_NORM,
    "lm_head": gguf.MODEL_TENSOR.OUTPUT,
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_tensor_name(module: str, suffix: str = "weight") -> str | None:
    """llama.cpp's name for the parameter `<module>.<suffix>` of a transformers LLaMA (e.g.
    `model.layers.3.self_attn.q_proj` -> `blk.3.attn_q.weight`); None for a module llama.cpp has no tensor for."""
    if module in _TOP_MODULES:
        return _name(_TOP_MODULES[module], suffix=suffix)
    match = _LAYER_RE.match(module)
    if match and match.group(2) in _LAYER_MODULES:
        return _name(_LAYER_MODULES[match.group(2)], int(match.group(1)), suffix)
    return None


def rope_rows_interleaved(rows: np.ndarray, n_head: int) -> np.ndarray:
    """q_proj / k_proj output rows (`(n_head * head_dim, ...)`, a weight, a bias or a LoRA's lora_B) from
    transformers' rotate-half order to the neighbour pairs llama.cpp's `llama` rope rotates.

    In each head transformers rotates dimension j with j + head_dim/2, both at frequency base^(-2j/head_dim);
    llama.cpp rotates 2j with 2j+1 at that same frequency. So row j of a head's first half moves to 2j and row j
    of its second half to 2j+1: (head, half, j) -> (head, j, half).
    """
    head_dim = rows.shape[0] // n_head
    # (n_head, 2, head_dim/2, ...) -> (n_head, head_dim/2, 2, ...) -> back to (n_head * head_dim, ...)
    return rows.reshape(n_head, 2, head_dim // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


# --- hyperparameters -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaShape:
    """The hyperparameters llama.cpp's `llama` architecture reads, from a transformers config."""

    name: str
    n_vocab: int
    n_ctx: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope: dict
    tied: bool

    @property
    def rope_type(self) -> str:
        return self.rope.get("rope_type", "default")

    @property
    def q_rows(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_rows(self) -> int:
        return self.n_head_kv * self.head_dim

    def weight_shapes(self) -> dict[str, tuple[int, int]]:
        """Every 2-D weight llama.cpp expects, by transformers module name: (out_features, in_features)."""
        shapes = {
            "model.embed_tokens": (self.n_vocab, self.n_embd),
            "lm_head": (self.n_vocab, self.n_embd),
        }
        per_layer = {
            "self_attn.q_proj": (self.q_rows, self.n_embd),
            "self_attn.k_proj": (self.kv_rows, self.n_embd),
            "self_attn.v_proj": (self.kv_rows, self.n_embd),
            "self_attn.o_proj": (self.n_embd, self.q_rows),
            "mlp.gate_proj": (self.n_ff, self.n_embd),
            "mlp.up_proj": (self.n_ff, self.n_embd),
            "mlp.down_proj": (self.n_embd, self.n_ff),
        }
        for layer in range(self.n_layer):
            shapes.update({f"model.layers.{layer}.{module}": shape for module, shape in per_layer.items()})
        return shapes

    def rope_heads(self, module: str) -> int | None:
        """How many heads' rows `module`'s output holds when it feeds rope (q_proj / k_proj), else None."""
        if module.endswith("self_attn.q_proj"):
            return self.n_head
        if module.endswith("self_attn.k_proj"):
            return self.n_head_kv
        return None


def read_shape(model_dir: str | Path) -> LlamaShape:
    """The hyperparameters of the checkpoint in `model_dir`; CheckpointError for an architecture or an option
    llama.cpp's `llama` graph does not compute the same way."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir} has no config.json; point at a transformers model directory")
    config = AutoConfig.from_pretrained(model_dir)
    model_type = config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{model_dir}: architecture {model_type!r} ({', '.join(config.architectures or [])}) cannot be converted "
            f"to GGUF; use a LLaMA-class LLM ({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False):
        raise CheckpointError(
            f"{model_dir}: an MLP with hidden_act={config.hidden_act!r}, mlp_bias={getattr(config, 'mlp_bias', False)} "
            "is not LLaMA's SwiGLU; use a LLaMA-class LLM"
        )
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{model_dir}: a partial rotary embedding cannot be converted; use full rope")
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
        raise CheckpointError(
            f"{model_dir}: rope scaling {rope['rope_type']!r} cannot be converted to GGUF (default, linear and llama3 "
            "can); use a checkpoint without it"
        )
    return LlamaShape(
        name=model_dir.name,
        n_vocab=config.vocab_size,
        n_ctx=_context_length(model_dir, config),
        n_embd=config.hidden_size,
        n_layer=config.num_hidden_layers,
        n_ff=config.intermediate_size,
        n_head=n_head,
        n_head_kv=getattr(config, "num_key_value_heads", None) or n_head,
        head_dim=head_dim,
        rms_eps=config.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        rope=rope,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


def _context_length(model_dir: Path, config) -> int:
    """The trained context llama.cpp is told (its default context, and the length past which it warns). A sliding
    window (Mistral v0.1, Qwen2 with use_sliding_window) bounds it: llama.cpp's `llama` graph attends to every
    earlier position, which equals the windowed model's attention only up to the window."""
    n_ctx = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        window = None
    if window and window < n_ctx:
        n_ctx = window
    return n_ctx


def _add_hyperparameters(writer: GGUFWriter, shape: LlamaShape, ftype: str) -> None:
    """The `llama.*` keys and the file type."""
    writer.add_context_length(shape.n_ctx)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    if shape.head_dim != shape.n_embd // shape.n_head:  # llama.cpp assumes n_embd / n_head unless told
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    if shape.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(shape.rope["factor"]))
    writer.add_vocab_size(shape.n_vocab)
    writer.add_file_type(FTYPES[ftype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_tensors(shape: LlamaShape) -> list[GGUFTensor]:
    """llama3's scaling is a tensor: llama.cpp divides each pair's angle by its `rope_freqs` entry."""
    if shape.rope_type != "llama3":
        return []
    factors = _llama3_freq_factors(shape)
    return [GGUFTensor(_name(gguf.MODEL_TENSOR.ROPE_FREQS), factors.shape, GGMLQuantizationType.F32, lambda: factors)]


def _llama3_freq_factors(shape: LlamaShape) -> np.ndarray:
    """(head_dim/2,) float32: transformers' default inverse frequencies over its llama3-scaled ones."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=shape.n_embd,
        num_attention_heads=shape.n_head,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.n_ctx,
        rope_parameters=shape.rope,
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    default = 1.0 / (shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float64) / shape.head_dim))
    return (default / scaled.double()).float().numpy()


# --- tokenizer -------------------------------------------------------------------------------------------------

# Hugging Face pre-tokenizers -> llama.cpp's name for the same split (`tokenizer.ggml.pre`).
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's pre-tokenizer for a tokenizer.json `pre_tokenizer`, or None when llama.cpp has none like it."""
    if pre is None:
        return None
    steps = pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]
    kinds = [step["type"] for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"  # GPT-2's regex
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # every digit alone, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(regex)
    return None


@dataclass
class Vocab:
    """The `tokenizer.*` keys."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (sentencepiece)
    tokens: list[str]
    types: list[int]
    merges: list[str] | None = None
    scores: list[float] | None = None
    pre: str | None = None
    special: dict[str, int | None] | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | list | None = None

    def add_to(self, writer: GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        adders = {
            "bos": writer.add_bos_token_id,
            "eos": writer.add_eos_token_id,
            "unk": writer.add_unk_token_id,
            "pad": writer.add_pad_token_id,
        }
        for role, token_id in (self.special or {}).items():
            if token_id is not None:
                adders[role](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def read_vocab(model_dir: str | Path, n_vocab: int) -> Vocab:
    """The tokenizer in `model_dir` as llama.cpp's: byte-level BPE ("gpt2") from tokenizer.json, or a
    sentencepiece model ("llama") from tokenizer.model; `n_vocab` tokens (the embedding's rows), the rows past the
    tokenizer's own filled with unused `[PAD<i>]` tokens, as llama.cpp needs one token per row."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    hf = AutoTokenizer.from_pretrained(model_dir)
    spec = json.loads((model_dir / "tokenizer.json").read_text()) if (model_dir / "tokenizer.json").is_file() else {}
    model = spec.get("model", {})
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        vocab = _byte_level_bpe(model_dir, spec, n_vocab)
    elif (model_dir / "tokenizer.model").is_file():
        vocab = _sentencepiece(model_dir, hf, n_vocab)
    else:
        kind = model.get("type") or "no tokenizer.json"
        raise CheckpointError(
            f"{model_dir}: tokenizer {kind} cannot be converted to GGUF; llama.cpp needs a byte-level BPE "
            "tokenizer.json or a sentencepiece tokenizer.model"
        )
    vocab.special = {role: getattr(hf, f"{role}_token_id", None) for role in ("bos", "eos", "unk", "pad")}
    vocab.add_bos, vocab.add_eos = _adds_bos_eos(hf)
    vocab.chat_template = _chat_template(hf)
    return vocab


def _byte_level_bpe(model_dir: Path, spec: dict, n_vocab: int) -> Vocab:
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise CheckpointError(
            f"{model_dir}: pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]} has no llama.cpp "
            "equivalent (GPT-2's ByteLevel, SmolLM's digits + ByteLevel, LLaMA 3's and Qwen2's splits do)"
        )
    tokens, types = _empty_vocab(n_vocab)
    entries = [(i, t, TokenType.NORMAL) for t, i in spec["model"]["vocab"].items()]
    # Added tokens: special ones (<|im_end|>) are control tokens, llama.cpp never splits the others either.
    entries += [
        (a["id"], a["content"], TokenType.CONTROL if a["special"] else TokenType.USER_DEFINED)
        for a in spec.get("added_tokens", [])
    ]
    _place(model_dir, tokens, types, entries)
    # Merges: "a b" strings (older tokenizers) or [a, b] pairs (newer); llama.cpp reads "a b".
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return Vocab(model="gpt2", tokens=tokens, types=types, merges=merges, pre=pre)


def _sentencepiece(model_dir: Path, hf, n_vocab: int) -> Vocab:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    tokens, types = _empty_vocab(n_vocab)
    scores = [-1000.0] * n_vocab
    entries = []
    for i in range(sp.get_piece_size()):
        entries.append((i, sp.id_to_piece(i), _piece_type(sp, i)))
        if i < n_vocab:
            scores[i] = sp.get_score(i)
    entries += [
        (i, t.content, TokenType.CONTROL if t.special else TokenType.USER_DEFINED)
        for i, t in hf.added_tokens_decoder.items()
        if i >= sp.get_piece_size()
    ]
    _place(model_dir, tokens, types, entries)
    # sentencepiece marks a word start with "▁"; whether the text's first word gets one is the model's setting.
    first = sp.encode("a", out_type=str)
    add_space_prefix = bool(first) and first[0].startswith("\u2581")
    return Vocab(
        model="llama", tokens=tokens, types=types, scores=scores, pre="default", add_space_prefix=add_space_prefix
    )


def _piece_type(sp, piece_id: int) -> TokenType:
    checks = (
        (sp.is_unknown, TokenType.UNKNOWN),
        (sp.is_control, TokenType.CONTROL),
        (sp.is_unused, TokenType.UNUSED),
        (sp.is_byte, TokenType.BYTE),
    )
    return next((kind for check, kind in checks if check(piece_id)), TokenType.NORMAL)


def _empty_vocab(n_vocab: int) -> tuple[list[str], list[int]]:
    return [f"[PAD{i}]" for i in range(n_vocab)], [TokenType.UNUSED] * n_vocab


def _place(model_dir: Path, tokens: list[str], types: list[int], entries: list[tuple[int, str, TokenType]]) -> None:
    for token_id, text, kind in entries:
        if token_id >= len(tokens):
            raise CheckpointError(
                f"{model_dir}: the tokenizer has token id {token_id} but the model only {len(tokens)} embeddings; "
                "use the tokenizer saved with this model"
            )
        tokens[token_id], types[token_id] = text, int(kind)


def _adds_bos_eos(hf) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS before / EOS after a text: what it does, not what a flag claims."""
    plain = hf("a", add_special_tokens=False)["input_ids"]
    full = hf("a", add_special_tokens=True)["input_ids"]
    adds_bos = hf.bos_token_id is not None and full[:1] == [hf.bos_token_id] and plain[:1] != full[:1]
    adds_eos = hf.eos_token_id is not None and full[-1:] == [hf.eos_token_id] and plain[-1:] != full[-1:]
    return adds_bos, adds_eos


def _chat_template(hf) -> str | list | None:
    template = getattr(hf, "chat_template", None)
    if isinstance(template, dict):  # named templates: llama.cpp's "default" one plus `tokenizer.chat_template.NAME`
        return [{"name": name, "template": text} for name, text in template.items()]
    return template


# --- tensors -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor to write: its GGUF name, torch-order shape, stored type, and how to get its float32 values (or,
    for a tensor copied as it is, its stored bytes: `raw=True`)."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    load: Callable[[], np.ndarray]
    raw: bool = False

    def stored(self) -> tuple[tuple[int, ...], np.dtype, int]:
        """(shape, numpy dtype, bytes) as gguf-py's writer declares it before any data is read."""
        if self.qtype == GGMLQuantizationType.F32:
            return self.shape, np.dtype(np.float32), 4 * math.prod(self.shape)
        if self.qtype == GGMLQuantizationType.F16:
            return self.shape, np.dtype(np.float16), 2 * math.prod(self.shape)
        byte_shape = quant_shape_to_byte_shape(self.shape, self.qtype)
        return byte_shape, np.dtype(np.uint8), math.prod(byte_shape)

    def encoded(self) -> np.ndarray:
        data = self.load()
        return data if self.raw else quantize(np.ascontiguousarray(data, dtype=np.float32), self.qtype)


def tensor_qtype(name: str, shape: tuple[int, ...], ftype: str, has_output: bool) -> GGMLQuantizationType:
    """The type a tensor is stored in for `ftype`, with llama.cpp's exceptions: 1-D tensors (norms, biases, rope
    factors) stay f32; a row that is not a whole number of quant blocks stays f16; in a 4-bit file the output
    projection (`output.weight`, or `token_embd.weight` when it doubles as the output) is q8_0, as llama.cpp's
    quantizer keeps the tensor most sensitive to rounding at a higher precision."""
    qtype = FTYPES[ftype][0]
    if len(shape) < 2:
        return GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return GGMLQuantizationType.F16
    is_output = name == _name(gguf.MODEL_TENSOR.OUTPUT) or (
        not has_output and name == _name(gguf.MODEL_TENSOR.TOKEN_EMBD)
    )
    if qtype in _FOUR_BIT and is_output:
        return GGMLQuantizationType.Q8_0
    return qtype


def _weight_files(model_dir: Path) -> list[Path]:
    from mllm.hub import require_safetensors

    require_safetensors(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return [model_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    raise CheckpointError(f"{model_dir} has no model.safetensors; save the model with save_pretrained")


def _llm_tensors(model_dir: Path, shape: LlamaShape, ftype: str, stack: ExitStack) -> list[GGUFTensor]:
    """Every weight of the checkpoint as a `GGUFTensor`, in llama.cpp's names and layout, read lazily."""
    from safetensors import safe_open

    found: dict[str, tuple[object, str]] = {}  # GGUF name -> (open file, checkpoint key)
    for path in _weight_files(model_dir):
        handle = stack.enter_context(safe_open(path, framework="pt"))
        for key in handle.keys():
            module, _, suffix = key.rpartition(".")
            if module.endswith("rotary_emb"):  # old checkpoints saved rope's inv_freq buffer: recomputed
                continue
            name = gguf_tensor_name(module, suffix)
            if name is None:
                raise CheckpointError(
                    f"{model_dir}: weight {key} has no place in llama.cpp's LLaMA; use a LLaMA-class LLM"
                )
            if name == _name(gguf.MODEL_TENSOR.OUTPUT) and shape.tied:
                continue  # a saved copy of the tied embedding: llama.cpp reuses token_embd when output is absent
            found[name] = (handle, key)
    required = [_name(gguf.MODEL_TENSOR.TOKEN_EMBD), _name(gguf.MODEL_TENSOR.OUTPUT_NORM)]
    required += [] if shape.tied else [_name(gguf.MODEL_TENSOR.OUTPUT)]
    if missing := [name for name in required if name not in found]:
        raise CheckpointError(f"{model_dir}: weights for {', '.join(missing)} are missing; save the whole model again")
    has_output = _name(gguf.MODEL_TENSOR.OUTPUT) in found
    tensors = []
    for name, (handle, key) in found.items():
        dims = tuple(handle.get_slice(key).get_shape())
        tensors.append(GGUFTensor(name, dims, tensor_qtype(name, dims, ftype, has_output), _loader(handle, key, shape)))
    return tensors


def _loader(handle, key: str, shape: LlamaShape) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        values = handle.get_tensor(key).float().numpy()  # bf16 / f16 / f32 -> f32, one tensor at a time
        heads = shape.rope_heads(key.rpartition(".")[0])
        return rope_rows_interleaved(values, heads) if heads else values

    return load


# --- writing -------------------------------------------------------------------------------------------------


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it is made durable and renamed to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_gguf(
    out_path: str | Path, arch: str, metadata: Callable[[GGUFWriter], None], tensors: list[GGUFTensor]
) -> Path:
    """A GGUF at `out_path`: `metadata` adds the keys, then the tensors are declared and streamed one by one."""
    out_path = Path(out_path)
    with _replacing(out_path) as tmp:
        writer = GGUFWriter(tmp, arch)
        try:
            metadata(writer)
            for tensor in tensors:
                shape, dtype, nbytes = tensor.stored()
                raw_dtype = (
                    None if tensor.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) else tensor.qtype
                )
                writer.add_tensor_info(tensor.name, shape, dtype, nbytes, raw_dtype=raw_dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for tensor in tensors:
                writer.write_tensor_data(tensor.encoded())
        finally:
            writer.close()
    return out_path


def write_llm_gguf(model_dir: str | Path, out_path: str | Path, ftype: str = "f16") -> Path:
    """Convert the transformers LLaMA-class checkpoint in `model_dir` (safetensors, config.json, tokenizer) to a
    GGUF at `out_path` that llama.cpp loads as `llama`, its 2-D weights in `ftype` (see `FTYPES`)."""
    _check_ftype(ftype)
    model_dir = Path(model_dir)
    shape = read_shape(model_dir)
    vocab = read_vocab(model_dir, shape.n_vocab)

    def metadata(writer: GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(shape.name)
        _add_hyperparameters(writer, shape, ftype)
        vocab.add_to(writer)

    with ExitStack() as stack:  # the weight files stay open while their tensors stream out
        tensors = _rope_tensors(shape) + _llm_tensors(model_dir, shape, ftype, stack)
        return write_gguf(out_path, ARCH, metadata, tensors)


# --- LoRA adapters -----------------------------------------------------------------------------------------------

_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# peft saves a copy of the base weight beside a LoRA on lm_head / embeddings, in case the vocabulary was resized.
_BASE_COPY_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.base_layer\.weight$")


def _lora_config(adapter_dir: Path) -> dict:
    from mllm.hub import require_safetensors_adapter

    require_safetensors_adapter(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{adapter_dir} has no adapter_config.json; save the LoRA adapter with save_pretrained")
    config = json.loads(config_path.read_text())
    refusals = {
        "peft_type": config.get("peft_type", "LORA") != "LORA",
        "use_dora": config.get("use_dora"),
        "modules_to_save": config.get("modules_to_save"),
        "lora_bias": config.get("lora_bias"),
        "fan_in_fan_out": config.get("fan_in_fan_out"),
    }
    if refused := [key for key, bad in refusals.items() if bad]:
        raise CheckpointError(
            f"{adapter_dir}: {', '.join(f'{k}={config.get(k)!r}' for k in refused)} cannot be applied by llama.cpp; "
            "train a plain LoRA adapter (no DoRA, bias or fully saved modules)"
        )
    return config


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key that matches the end of `module`'s name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _lora_scale_fix(config: dict, module: str, rank: int) -> float:
    """What lora_B is multiplied by so that llama.cpp's scale (alpha / rank, with the file's single alpha) gives
    peft's (the module's alpha / rank, or / sqrt(rank) with rslora)."""
    alpha = float(config["lora_alpha"])
    module_alpha = float(_pattern_value(config.get("alpha_pattern"), module, alpha))
    wanted = module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    applied = alpha / rank if alpha else 1.0  # llama.cpp: alpha 0 means scale 1
    return wanted / applied


def write_lora_gguf(
    adapter_dir: str | Path, base_model_dir: str | Path, out_path: str | Path, dtype: str = "f32"
) -> Path:
    """Convert the peft LoRA adapter in `adapter_dir` (trained on the checkpoint in `base_model_dir`) to a GGUF
    LoRA adapter at `out_path` that llama.cpp applies to that base model's GGUF at run time."""
    from safetensors import safe_open

    if dtype not in LORA_DTYPES:
        raise CheckpointError(f"LoRA GGUF type {dtype!r} is not supported; use one of {', '.join(LORA_DTYPES)}")
    adapter_dir = Path(adapter_dir)
    config = _lora_config(adapter_dir)
    shape = read_shape(base_model_dir)
    with safe_open(adapter_dir / "adapter_model.safetensors", framework="pt") as handle:
        tensors = _lora_tensors(adapter_dir, handle, shape, config, LORA_DTYPES[dtype])

        def metadata(writer: GGUFWriter) -> None:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_name(adapter_dir.name)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))

        return write_gguf(out_path, ARCH, metadata, tensors)


def _lora_tensors(adapter_dir: Path, handle, shape: LlamaShape, config: dict, qtype) -> list[GGUFTensor]:
    """Every lora_a / lora_b pair of the adapter, checked against the base model's weights."""
    expected = shape.weight_shapes()
    pairs: dict[str, dict[str, str]] = {}  # module -> {"A": key, "B": key}
    for key in handle.keys():
        copy = _BASE_COPY_KEY.match(key)
        if copy and tuple(handle.get_slice(key).get_shape()) == expected.get(copy["module"]):
            continue  # the base's own weight (same vocabulary): llama.cpp uses the base GGUF's
        match = _LORA_KEY.match(key)
        if not match or gguf_tensor_name(match["module"]) is None:
            raise CheckpointError(
                f"{adapter_dir}: adapter weight {key} cannot be applied by llama.cpp; target the attention and MLP "
                "projections (q/k/v/o_proj, gate/up/down_proj) or lm_head"
            )
        pairs.setdefault(match["module"], {})[match["part"]] = key
    tensors = []
    for module, keys in pairs.items():
        tensors += _lora_pair(adapter_dir, handle, module, keys, shape, expected, config, qtype)
    return tensors


def _lora_pair(
    adapter_dir: Path,
    handle,
    module: str,
    keys: dict[str, str],
    shape: LlamaShape,
    expected: dict[str, tuple[int, int]],
    config: dict,
    qtype: GGMLQuantizationType,
) -> list[GGUFTensor]:
    """lora_a (peft's A, `(r, in)`: llama.cpp's ne = [in, r]) and lora_b (`(out, r)`: ne = [r, out]) for one
    base weight, B's rows in llama.cpp's rope order and its scale folded in where peft's differs."""
    if set(keys) != {"A", "B"}:
        raise CheckpointError(f"{adapter_dir}: {module} has lora_{''.join(keys)} only; save the adapter again")
    a_shape = tuple(handle.get_slice(keys["A"]).get_shape())
    b_shape = tuple(handle.get_slice(keys["B"]).get_shape())
    base = expected.get(module)
    if module == "lm_head" and shape.tied:
        raise CheckpointError(
            f"{adapter_dir}: a LoRA on lm_head of a model with tied embeddings cannot be applied by llama.cpp; "
            "train the adapter without lm_head"
        )
    if base is None or (b_shape[0], a_shape[1]) != base or a_shape[0] != b_shape[1]:
        raise CheckpointError(
            f"{adapter_dir}: {module} lora_A {a_shape} / lora_B {b_shape} do not fit the base weight {base}; "
            "use the base model the adapter was trained on"
        )
    rank = a_shape[0]
    fix = _lora_scale_fix(config, module, rank)
    heads = shape.rope_heads(module)

    def load_b() -> np.ndarray:
        b = handle.get_tensor(keys["B"]).float().numpy() * np.float32(fix)
        return rope_rows_interleaved(b, heads) if heads else b

    name = gguf_tensor_name(module)
    return [
        GGUFTensor(f"{name}.lora_a", a_shape, qtype, lambda: handle.get_tensor(keys["A"]).float().numpy()),
        GGUFTensor(f"{name}.lora_b", b_shape, qtype, load_b),
    ]


# --- re-quantizing -----------------------------------------------------------------------------------------------

# Keys gguf-py's writer sets itself, and keys that describe the old tensor types.
_REWRITTEN_KEYS = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION}


def requantize_gguf(src: str | Path, dst: str | Path, ftype: str) -> Path:
    """Re-write the GGUF `src` at `dst` with its weights in `ftype` (dequantized, then quantized again; a tensor
    already in its new type is copied byte for byte), every metadata key kept but the file type."""
    _check_ftype(ftype)
    reader = GGUFReader(src)
    arch = _field_value(reader, gguf.Keys.General.ARCHITECTURE)
    names = {t.name for t in reader.tensors}
    has_output = _name(gguf.MODEL_TENSOR.OUTPUT) in names
    tensors = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # ne (innermost first) -> torch order
        qtype = tensor_qtype(t.name, shape, ftype, has_output)
        if qtype == t.tensor_type:
            tensors.append(GGUFTensor(t.name, shape, qtype, lambda t=t: t.data, raw=True))
        else:
            tensors.append(
                GGUFTensor(
                    t.name, shape, qtype, lambda t=t, shape=shape: dequantize(t.data, t.tensor_type).reshape(shape)
                )
            )

    def metadata(writer: GGUFWriter) -> None:
        _copy_fields(reader, writer)
        writer.add_file_type(FTYPES[ftype][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    return write_gguf(dst, arch, metadata, tensors)


def _field_value(reader: GGUFReader, key: str):
    field = reader.get_field(key)
    if field is None:
        raise CheckpointError(f"{reader.data.filename}: no {key}; convert the model again")
    return field.contents()


def _copy_fields(reader: GGUFReader, writer: GGUFWriter) -> None:
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _REWRITTEN_KEYS:
            continue
        if key == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(field.contents())
        sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)


# --- the cache -------------------------------------------------------------------------------------------------

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def _safetensors_header(path: Path) -> bytes:
    """A safetensors file's JSON header (names, dtypes, shapes, offsets): its first 8 bytes say how long it is."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return f.read(length)


def _fingerprint(digest, directory: Path, small: tuple[str, ...], large: list[Path]) -> None:
    """Feed `digest` the whole content of the `small` files of `directory` (config, tokenizer) and, for each
    `large` weight file, its size, modification time and (safetensors) header.

    Reading every weight byte on each start would cost a good part of what the cache saves; the header catches a
    different model of the same size, the modification time a file rewritten in place with new values. A copied
    checkpoint gets new times, and so one more conversion, never a stale file."""
    for name in small:
        if (directory / name).is_file():
            digest.update(name.encode() + b"\0" + (directory / name).read_bytes() + b"\0")
    for path in large:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        if path.suffix == ".safetensors":
            digest.update(_safetensors_header(path))


def _new_digest(*parts: str):
    return hashlib.sha256(":".join(("mllm-gguf", str(_CONVERTER_VERSION), *parts)).encode())


def checkpoint_key(model_dir: str | Path, ftype: str) -> str:
    """A hash naming what `write_llm_gguf(model_dir, ..., ftype)` writes (`_fingerprint` says what it covers)."""
    model_dir = Path(model_dir)
    digest = _new_digest("model", ftype)
    _fingerprint(digest, model_dir, ("config.json", *_TOKENIZER_FILES), _weight_files(model_dir))
    return digest.hexdigest()


def _cached(cache_dir: str | Path | None, name: str, key: str, write: Callable[[Path], Path]) -> Path:
    """`<cache_dir>/<name>-<key>/model.gguf`, written by `write(path)` only when it is not there yet."""
    from mllm.llm import cache_root

    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "gguf"
    target = cache_dir / f"{name}-{key[:24]}"
    recover(target)  # a kill between the two renames of an earlier swap
    if (target / CACHED_NAME).is_file():
        return target / CACHED_NAME
    with atomic_directory(target) as tmp:  # whole or absent: a kill mid-conversion leaves nothing at `target`
        write(tmp / CACHED_NAME)
    return target / CACHED_NAME


def cached_gguf(model_dir: str | Path, ftype: str = "f16", cache_dir: str | Path | None = None) -> Path:
    """The GGUF of the checkpoint in `model_dir` in `ftype`: converted on the first call, found on later ones
    under `cache_dir` (default: `<cache_root>/gguf`)."""
    _check_ftype(ftype)
    model_dir = Path(model_dir).resolve()
    key = checkpoint_key(model_dir, ftype)
    return _cached(cache_dir, f"{model_dir.name}-{ftype}", key, lambda out: write_llm_gguf(model_dir, out, ftype))


def cached_lora_gguf(
    adapter_dir: str | Path, base_model_dir: str | Path, cache_dir: str | Path | None = None, dtype: str = "f32"
) -> Path:
    """The GGUF LoRA adapter of the peft adapter in `adapter_dir` for the base in `base_model_dir`, written once.
    The key covers the adapter's files and the base's config.json (its head counts order lora_B's rows)."""
    adapter_dir, base_model_dir = Path(adapter_dir).resolve(), Path(base_model_dir).resolve()
    digest = _new_digest("lora", dtype)
    _fingerprint(digest, adapter_dir, ("adapter_config.json",), [adapter_dir / "adapter_model.safetensors"])
    _fingerprint(digest, base_model_dir, ("config.json",), [])
    return _cached(
        cache_dir,
        f"{adapter_dir.name}-lora-{dtype}",
        digest.hexdigest(),
        lambda out: write_lora_gguf(adapter_dir, base_model_dir, out, dtype),
    )


def cached_requantized(src: str | Path, ftype: str, cache_dir: str | Path | None = None) -> Path:
    """`requantize_gguf(src, ..., ftype)`, written once (keyed by the source's name, size and modification time)."""
    _check_ftype(ftype)
    src = Path(src).resolve()
    digest = _new_digest("requantized", ftype)
    _fingerprint(digest, src.parent, (), [src])
    return _cached(cache_dir, f"{src.stem}-{ftype}", digest.hexdigest(), lambda out: requantize_gguf(src, out, ftype))
