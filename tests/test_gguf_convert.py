"""GGUF conversion: the files llama.cpp loads give transformers' logits, tokens and LoRA deltas.

Each check runs the written file in llama.cpp (llama-cpp-python's low-level API) beside the transformers /
peft model it came from, on the same token ids, on the tiny random checkpoints built in tests.
"""

from __future__ import annotations

import ctypes
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from mllm import gguf_convert
from mllm.errors import CheckpointError
from mllm.gguf_convert import (
    cached_gguf,
    requantize_gguf,
    rope_rows_interleaved,
    write_llm_gguf,
    write_lora_gguf,
)

CHAT = "<|im_start|>user\nwhat color is the circle? 0123<|im_end|>\n<|im_start|>assistant\nthe circle is red"
TEXTS = [
    "hello, how are you today?",
    "The quick brown fox  jumps\n\tover 0123456789 dogs!",
    "  leading spaces, ünïcödé ✓ and 日本",
    CHAT,
]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# max |llama.cpp logit - transformers logit| / max |transformers logit| (0.64) on the tiny LLaMA's chat, 29 tokens.
# Measured: f32 3.3e-7 (summation order only), f16 4.9e-4, bf16 4.1e-3, q8_0 1.3e-2, q4_0 0.144, q4_1 0.167 (greedy
# token equal at 83% / 90% of positions: the random model's logits are nearly flat). The bounds sit a little above.
RELATIVE_TOLERANCE = {"f32": 1e-6, "f16": 1e-3, "bf16": 8e-3, "q8_0": 2e-2, "q4_0": 0.2, "q4_1": 0.22}
SAME_GREEDY_TOKENS = ("f32", "f16", "q8_0")  # measured: the argmax equal at every position


# --- llama.cpp ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    """llama_cpp with its backend started; its log (a page per model load) down to errors."""
    import logging

    import llama_cpp

    logger = logging.getLogger("llama-cpp-python")  # where llama-cpp-python routes llama.cpp's log
    level = logger.level
    logger.setLevel(logging.ERROR)
    llama_cpp.llama_backend_init()
    yield llama_cpp
    logger.setLevel(level)


class LlamaRun:
    """One GGUF loaded in llama.cpp with a small context; `logits(ids)` runs a fresh sequence."""

    def __init__(self, llama_cpp, path: Path, lora: Path | None = None, lora_scale: float = 1.0):
        self.ll = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert self.model, f"llama.cpp could not load {path}"
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = ctx_params.n_batch = ctx_params.n_ubatch = 128
        ctx_params.n_threads = ctx_params.n_threads_batch = 1
        # K and V in float32, no flash attention (on CPU it rounds to f16: 3.4e-4 of the f32 logits by itself): the
        # comparison measures the weights alone.
        ctx_params.type_k = ctx_params.type_v = llama_cpp.GGML_TYPE_F32
        ctx_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, ctx_params)
        assert self.ctx
        self.adapter = None
        if lora is not None:
            self.adapter = llama_cpp.llama_adapter_lora_init(self.model, str(lora).encode())
            assert self.adapter, f"llama.cpp could not load the adapter {lora}"
            set_adapter(llama_cpp, self.ctx, self.adapter, lora_scale)

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), n_vocab) float32: the logits at every position, the sequence decoded from position 0."""
        ll = self.ll
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        batch = ll.llama_batch_init(len(ids), 0, 1)
        try:
            for i, token in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, True
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(ids)
            assert ll.llama_decode(self.ctx, batch) == 0
            rows = [
                np.ctypeslib.as_array(ll.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                for i in range(len(ids))
            ]
            return np.stack(rows).astype(np.float32)
        finally:
            ll.llama_batch_free(batch)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        out = (self.ll.llama_token * (len(data) + 8))()
        n = self.ll.llama_tokenize(self.vocab, data, len(data), out, len(out), True, True)
        assert n >= 0
        return list(out[:n])

    def close(self) -> None:
        if self.adapter is not None:
            self.ll.llama_adapter_lora_free(self.adapter)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


def set_adapter(llama_cpp, ctx, adapter, scale: float) -> None:
    adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
    scales = (ctypes.c_float * 1)(scale)
    assert llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, scales) == 0


def llama_logits(llama_cpp, path: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    run = LlamaRun(llama_cpp, path, lora)
    try:
        return run.logits(ids)
    finally:
        run.close()


# --- transformers ------------------------------------------------------------------------------------------------


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    """The tiny LLaMA in transformers, and a chat's token ids."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(tiny_llama_dir)(CHAT)["input_ids"]
    return model, ids


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir, gguf_dir):
    """ftype -> the tiny LLaMA written in it (once per module)."""
    written: dict[str, Path] = {}

    def get(ftype: str) -> Path:
        if ftype not in written:
            written[ftype] = write_llm_gguf(tiny_llama_dir, gguf_dir / f"tiny-{ftype}.gguf", ftype)
        return written[ftype]

    return get


def fields(path: Path) -> dict:
    reader = GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


# --- the rope layout ---------------------------------------------------------------------------------------------


def test_permuted_rows_under_llama_cpp_rope_equal_transformers_rope():
    """The permutation, proven on rope itself: rotating transformers' q with rotate-half and then permuting equals
    permuting first and rotating neighbour pairs as llama.cpp does, at every position and frequency."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    n_head, head_dim, theta, positions = 3, 8, 10000.0, torch.arange(7)
    q = torch.randn(1, n_head, len(positions), head_dim, dtype=torch.float64)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (head_dim/2,)
    angles = positions[:, None] * inv_freq[None]  # (positions, head_dim/2)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[None], torch.cat([angles.sin()] * 2, -1)[None]
    hf_rotated, _ = apply_rotary_pos_emb(q, q, cos, sin)

    def rows(x):  # (1, n_head, positions, head_dim) -> (n_head * head_dim, positions): a projection's output rows
        return x[0].permute(0, 2, 1).reshape(n_head * head_dim, -1).numpy()

    permuted = rope_rows_interleaved(rows(q), n_head).reshape(n_head, head_dim // 2, 2, -1)
    even, odd = permuted[:, :, 0], permuted[:, :, 1]  # llama.cpp's pairs (2j, 2j+1), each (n_head, head_dim/2, pos)
    c, s = angles.T.cos().numpy(), angles.T.sin().numpy()  # (head_dim/2, positions)
    llama_rotated = np.stack([even * c - odd * s, even * s + odd * c], axis=2).reshape(n_head * head_dim, -1)
    np.testing.assert_allclose(llama_rotated, rope_rows_interleaved(rows(hf_rotated), n_head), atol=1e-12)


# --- the model file ----------------------------------------------------------------------------------------------


def test_metadata_names_every_hyperparameter_and_the_tokenizer(tiny_llama_dir, tiny_gguf):
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    meta = fields(tiny_gguf("f16"))
    expected = {
        "general.architecture": "llama",
        "general.type": "model",
        "general.file_type": 1,  # MOSTLY_F16
        "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": config["hidden_size"],
        "llama.block_count": config["num_hidden_layers"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config["num_key_value_heads"],
        "llama.rope.dimension_count": config["hidden_size"] // config["num_attention_heads"],
        "llama.rope.freq_base": 10000.0,
        "llama.vocab_size": config["vocab_size"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.ggml.unknown_token_id": tokenizer.unk_token_id,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_token_id,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": tokenizer.chat_template,
    }
    assert {key: meta.get(key) for key in expected} == expected
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    vocab = tokenizer.get_vocab()
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert meta["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # the three specials are control tokens
    assert set(meta["tokenizer.ggml.token_type"][3:]) == {1}
    spec = json.loads((tiny_llama_dir / "tokenizer.json").read_text())
    assert meta["tokenizer.ggml.merges"] == [" ".join(pair) for pair in spec["model"]["merges"]]


def test_tensor_types_follow_the_ftype_with_llama_cpp_exceptions(tiny_gguf):
    q, f32, f16 = GGMLQuantizationType, GGMLQuantizationType.F32, GGMLQuantizationType.F16
    weights = {"f32": f32, "f16": f16, "bf16": q.BF16, "q8_0": q.Q8_0, "q4_0": q.Q4_0, "q4_1": q.Q4_1}
    for ftype, weight_type in weights.items():
        tensors = {t.name: t for t in GGUFReader(tiny_gguf(ftype)).tensors}
        assert len(tensors) == 3 + 9 * 2  # embedding, output norm, output; nine per layer
        assert tensors["blk.1.attn_q.weight"].shape.tolist() == [64, 64]  # ne: [in, out]
        assert tensors["blk.1.attn_k.weight"].shape.tolist() == [64, 32]
        assert tensors["blk.0.ffn_down.weight"].shape.tolist() == [128, 64]
        assert tensors["token_embd.weight"].shape.tolist() == [64, 400]
        types = {name: t.tensor_type for name, t in tensors.items()}
        assert {types[n] for n in types if n.endswith("norm.weight")} == {f32}, ftype
        # 4-bit files keep the output projection, the tensor most sensitive to rounding, in q8_0.
        assert types["output.weight"] == (q.Q8_0 if ftype in ("q4_0", "q4_1") else weight_type)
        assert {types[n] for n in types if not n.endswith(("norm.weight", "output.weight"))} == {weight_type}


def test_rows_that_are_not_whole_quant_blocks_stay_f16():
    assert gguf_convert.tensor_qtype("blk.0.ffn_down.weight", (64, 48), "q8_0", True) == GGMLQuantizationType.F16
    assert gguf_convert.tensor_qtype("blk.0.ffn_down.weight", (64, 64), "q8_0", True) == GGMLQuantizationType.Q8_0
    assert gguf_convert.tensor_qtype("token_embd.weight", (400, 64), "q4_0", False) == GGMLQuantizationType.Q8_0


@pytest.mark.parametrize("ftype", list(RELATIVE_TOLERANCE))
def test_llama_cpp_logits_match_transformers(llama, tiny, tiny_gguf, ftype):
    model, ids = tiny
    reference = hf_logits(model, ids)
    ours = llama_logits(llama, tiny_gguf(ftype), ids)
    assert ours.shape == reference.shape
    assert relative_error(ours, reference) < RELATIVE_TOLERANCE[ftype]
    if ftype in SAME_GREEDY_TOKENS:
        assert (ours.argmax(-1) == reference.argmax(-1)).all()


def test_llama_cpp_tokenizes_like_the_hf_tokenizer(llama, tiny_llama_dir, tiny_gguf):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    run = LlamaRun(llama, tiny_gguf("f16"))
    try:
        for text in TEXTS:
            assert run.tokenize(text) == tokenizer(text)["input_ids"], text
    finally:
        run.close()


# --- other LLaMA-class checkpoints --------------------------------------------------------------------------------

SMALL = dict(
    vocab_size=400,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
VARIANTS = {
    # SmolLM2's layout: the output projection is the embedding.
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    # head_dim set apart from hidden_size / heads: llama.cpp is told key_length / value_length.
    "llama-head-dim": ("LlamaConfig", dict(head_dim=32, tie_word_embeddings=False)),
    "llama-linear-rope": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama3-rope": (
        "LlamaConfig",
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            rope_theta=500.0,  # a small base puts the tiny head's frequencies on both sides of llama3's bands
        ),
    ),
    "mistral": ("MistralConfig", dict(head_dim=16, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),  # q/k/v biases
}


def build_variant(directory: Path, tokenizer_dir: Path, kind: str) -> Path:
    import transformers

    config_class, options = VARIANTS[kind]
    torch.manual_seed(1)
    config = getattr(transformers, config_class)(**{**SMALL, **options})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # biases start at zero: make them matter
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_llama_class_variants_match_transformers_in_f32(llama, tiny_llama_dir, tmp_path, kind):
    source = build_variant(tmp_path / kind, tiny_llama_dir, kind)
    path = write_llm_gguf(source, tmp_path / f"{kind}.gguf", "f32")
    names = {t.name for t in GGUFReader(path).tensors}
    assert ("output.weight" in names) == (kind not in ("llama-tied", "qwen2"))
    assert ("blk.0.attn_q.bias" in names) == (kind == "qwen2")
    assert ("rope_freqs.weight" in names) == (kind == "llama3-rope")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(source)(CHAT)["input_ids"]
    reference = hf_logits(model, ids)
    ours = llama_logits(llama, path, ids)
    assert relative_error(ours, reference) < RELATIVE_TOLERANCE["f32"]
    assert (ours.argmax(-1) == reference.argmax(-1)).all()


def build_sentencepiece_llama(directory: Path) -> Path:
    """A tiny LLaMA with a LLaMA-2-style tokenizer: a sentencepiece BPE model (byte fallback, digits apart) in
    tokenizer.model, and the same tokenizer as tokenizer.json (what transformers loads), built the way
    transformers converts one: sentencepiece's pieces as the vocabulary, every split of a piece into two
    pieces as a merge, ranked by the piece."""
    import sentencepiece
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from mllm.tiny import CORPUS

    directory.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    sp = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    plain = {piece for piece, i in vocab.items() if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    splits = [(p[:k], p[k:], i) for p, i in vocab.items() if p in plain for k in range(1, len(p))]
    merges = sorted(
        (s for s in splits if s[0] in plain and s[1] in plain), key=lambda s: (s[2], vocab[s[0]], vocab[s[1]])
    )
    bpe = models.BPE(vocab, [(a, b) for a, b, _ in merges], unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(directory)
    torch.manual_seed(3)
    config = LlamaConfig(**{**SMALL, "pad_token_id": None, "vocab_size": sp.get_piece_size()})
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_sentencepiece_tokenizer_becomes_llama_cpp_s_llama_vocab(llama, tmp_path):
    import sentencepiece

    source = build_sentencepiece_llama(tmp_path / "spm")
    path = write_llm_gguf(source, tmp_path / "spm.gguf", "f32")
    meta = fields(path)
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.add_bos_token"]) == ("llama", True)
    assert meta["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]  # <unk>, <s>, </s>, <0x00>
    sp = sentencepiece.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    run = LlamaRun(llama, path)
    try:
        for text in TEXTS[:3]:  # sentencepiece's own ids, transformers' and llama.cpp's: one answer
            assert run.tokenize(text) == tokenizer(text)["input_ids"] == [sp.bos_id(), *sp.encode(text)], text
        ids = tokenizer(TEXTS[1])["input_ids"]
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        assert relative_error(run.logits(ids), hf_logits(model, ids)) < RELATIVE_TOLERANCE["f32"]
    finally:
        run.close()


# --- LoRA adapters -----------------------------------------------------------------------------------------------

LORA_OPTIONS = {
    "plain": dict(r=4, lora_alpha=8),
    "with-lm-head": dict(r=4, lora_alpha=8, target_modules=[*LORA_TARGETS, "lm_head"]),
    # peft's other scalings (alpha / sqrt(r), per-module rank and alpha): folded into lora_b.
    "rslora-patterns": dict(
        r=4, lora_alpha=8, use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3}
    ),
}


def build_adapter(model_dir: Path, directory: Path, options: dict):
    """A peft LoRA on every projection of the model, lora_B random (peft's default zeros would change nothing)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(**{"target_modules": LORA_TARGETS, "init_lora_weights": False, **options})
    peft_model = get_peft_model(base, config).eval()
    with torch.no_grad():  # smaller deltas: the adapter moves the logits without drowning the base model
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.2)
    with warnings.catch_warnings():  # a LoRA on lm_head: peft says it saves the base weight too (it is skipped)
        warnings.filterwarnings("ignore", message="Setting `save_embedding_layers`")
        peft_model.save_pretrained(directory)
    return peft_model


@pytest.mark.parametrize("kind", list(LORA_OPTIONS))
def test_lora_adapter_in_llama_cpp_gives_the_peft_logits(llama, tiny, tiny_llama_dir, tiny_gguf, tmp_path, kind):
    model, ids = tiny
    peft_model = build_adapter(tiny_llama_dir, tmp_path / "adapter", LORA_OPTIONS[kind])
    path = write_lora_gguf(tmp_path / "adapter", tiny_llama_dir, tmp_path / "adapter.gguf")
    meta = fields(path)
    assert (meta["general.type"], meta["adapter.type"], meta["adapter.lora.alpha"]) == ("adapter", "lora", 8.0)
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    with_lm_head = kind == "with-lm-head"
    # lora_a and lora_b for seven projections in two layers (and the output projection)
    assert len(tensors) == 2 * (7 * 2 + with_lm_head)
    assert ("output.weight.lora_b" in tensors) == with_lm_head
    assert tensors["blk.0.attn_k.weight.lora_a"].shape.tolist() == [64, 4]  # ne: [in, r]
    assert tensors["blk.0.attn_k.weight.lora_b"].shape.tolist() == [4, 32]  # ne: [r, out]

    reference = hf_logits(peft_model, ids)
    base = hf_logits(model, ids)
    ours = llama_logits(llama, tiny_gguf("f32"), ids, lora=path)
    # The adapter matters: it moves the logits by far more than the conversion's error.
    assert relative_error(base, reference) > 0.1
    assert relative_error(ours, reference) < RELATIVE_TOLERANCE["f32"]  # measured 3.6e-7 plain, 4.9e-7 rslora
    assert (ours.argmax(-1) == reference.argmax(-1)).all()


def test_f16_lora_adapter_within_f16_tolerance(llama, tiny, tiny_llama_dir, tiny_gguf, tmp_path):
    _, ids = tiny
    peft_model = build_adapter(tiny_llama_dir, tmp_path / "adapter", LORA_OPTIONS["plain"])
    path = write_lora_gguf(tmp_path / "adapter", tiny_llama_dir, tmp_path / "adapter.gguf", dtype="f16")
    assert {t.tensor_type for t in GGUFReader(path).tensors} == {GGMLQuantizationType.F16}
    reference = hf_logits(peft_model, ids)
    ours = llama_logits(llama, tiny_gguf("f32"), ids, lora=path)
    assert relative_error(ours, reference) < RELATIVE_TOLERANCE["f16"]  # measured 7.1e-4


# --- re-quantizing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["q8_0", "f16"])
def test_requantized_to_q4_0_keeps_metadata_and_runs(llama, tiny, tiny_gguf, tmp_path, source):
    model, ids = tiny
    path = requantize_gguf(tiny_gguf(source), tmp_path / "requantized.gguf", "q4_0")
    before, after = fields(tiny_gguf(source)), fields(path)
    assert after.pop("general.file_type") == 2  # MOSTLY_Q4_0
    before.pop("general.file_type")
    assert after == before
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    direct = {t.name: t.tensor_type for t in GGUFReader(tiny_gguf("q4_0")).tensors}
    assert types == direct
    ours = llama_logits(llama, path, ids)
    # Measured: 0.134 from q8_0, 0.143 from f16, as converting straight to q4_0 (0.144).
    assert relative_error(ours, hf_logits(model, ids)) < RELATIVE_TOLERANCE["q4_0"]
    if source == "f16":  # f16's rounding is too small to move many weights to another q4_0 step: 0.011 measured
        assert relative_error(ours, llama_logits(llama, tiny_gguf("q4_0"), ids)) < 0.02


def test_requantize_copies_tensors_already_in_their_type(tiny_gguf, tmp_path):
    path = requantize_gguf(tiny_gguf("q8_0"), tmp_path / "same.gguf", "q8_0")
    source = {t.name: t for t in GGUFReader(tiny_gguf("q8_0")).tensors}
    for tensor in GGUFReader(path).tensors:
        assert tensor.tensor_type == source[tensor.name].tensor_type
        assert np.array_equal(tensor.data, source[tensor.name].data), tensor.name


# --- the cache ---------------------------------------------------------------------------------------------------


def test_cache_converts_once_per_checkpoint_and_type(tiny_llama_dir, tmp_path, monkeypatch):
    source = tmp_path / "model"
    source.mkdir()
    for file in tiny_llama_dir.iterdir():
        (source / file.name).write_bytes(file.read_bytes())
    writes = []
    real_write = gguf_convert.write_llm_gguf
    monkeypatch.setattr(gguf_convert, "write_llm_gguf", lambda *args: writes.append(args) or real_write(*args))
    cache = tmp_path / "cache"

    first = cached_gguf(source, "q8_0", cache)
    stat = first.stat()
    again = cached_gguf(source, "q8_0", cache)
    assert again == first and len(writes) == 1
    assert (again.stat().st_ino, again.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert fields(first)["general.file_type"] == 7  # MOSTLY_Q8_0

    other_type = cached_gguf(source, "f16", cache)
    assert other_type != first and len(writes) == 2
    # Weights rewritten in place: a new key, a new conversion; the old file is not returned.
    weights = source / "model.safetensors"
    os.utime(weights, ns=(stat.st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    rewritten = cached_gguf(source, "q8_0", cache)
    assert rewritten != first and len(writes) == 3
    assert not list(cache.glob(".*"))  # no temporary leftovers


def test_cache_defaults_to_the_mllm_cache(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLLM_CACHE", str(tmp_path))
    path = cached_gguf(tiny_llama_dir, "q4_0")
    assert path.parent.parent == tmp_path / "gguf" and path.name == gguf_convert.CACHED_NAME


def test_cached_adapter_and_requantized_files_are_written_once(tiny_llama_dir, tiny_gguf, tmp_path, monkeypatch):
    build_adapter(tiny_llama_dir, tmp_path / "adapter", LORA_OPTIONS["plain"])
    calls = {"lora": 0, "requantize": 0}
    for name, kind in (("write_lora_gguf", "lora"), ("requantize_gguf", "requantize")):
        real = getattr(gguf_convert, name)
        monkeypatch.setattr(
            gguf_convert, name, lambda *a, real=real, kind=kind: calls.update({kind: calls[kind] + 1}) or real(*a)
        )
    cache = tmp_path / "cache"
    lora = [gguf_convert.cached_lora_gguf(tmp_path / "adapter", tiny_llama_dir, cache) for _ in range(2)]
    requantized = [gguf_convert.cached_requantized(tiny_gguf("q8_0"), "q4_0", cache) for _ in range(2)]
    assert lora[0] == lora[1] and requantized[0] == requantized[1] and calls == {"lora": 1, "requantize": 1}
    assert fields(lora[0])["adapter.type"] == "lora" and fields(requantized[0])["general.file_type"] == 2
    assert lora[0] != requantized[0]


# --- refusals ----------------------------------------------------------------------------------------------------


def test_refuses_other_architectures_by_name(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="architecture 'gpt2'.*LLaMA-class"):
        write_llm_gguf(tmp_path, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_refuses_unsupported_rope_scaling_and_types(tiny_llama_dir, tmp_path):
    source = tmp_path / "model"
    source.mkdir()
    for file in tiny_llama_dir.iterdir():
        (source / file.name).write_bytes(file.read_bytes())
    config = json.loads((source / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="rope scaling 'dynamic'"):
        write_llm_gguf(source, tmp_path / "out.gguf")
    with pytest.raises(CheckpointError, match="'q3_k' is not supported; use one of f32, f16"):
        write_llm_gguf(tiny_llama_dir, tmp_path / "out.gguf", "q3_k")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


def test_refuses_a_pickled_checkpoint(tiny_llama_dir, tmp_path):
    source = tmp_path / "model"
    source.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (source / name).write_bytes((tiny_llama_dir / name).read_bytes())
    (source / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        write_llm_gguf(source, tmp_path / "out.gguf")


def test_refuses_adapters_llama_cpp_cannot_apply(tiny_llama_dir, tmp_path):
    build_adapter(tiny_llama_dir, tmp_path / "dora", dict(r=2, lora_alpha=4, use_dora=True))
    with pytest.raises(CheckpointError, match="use_dora=True"):
        write_lora_gguf(tmp_path / "dora", tiny_llama_dir, tmp_path / "dora.gguf")
    build_adapter(tiny_llama_dir, tmp_path / "plain", dict(r=2, lora_alpha=4))
    other = build_variant(tmp_path / "other", tiny_llama_dir, "llama-head-dim")
    with pytest.raises(CheckpointError, match="do not fit the base weight"):
        write_lora_gguf(tmp_path / "plain", other, tmp_path / "plain.gguf")


# --- the offline SmolLM2 -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2 as transformers reads it (converted once from the shipped GGUF), and the shipped GGUF."""
    from mllm.llm import SMOLLM2_GGUF, ensure_smollm2, smollm2_gguf_dir

    return ensure_smollm2(), smollm2_gguf_dir() / SMOLLM2_GGUF


def smollm2_prompt(model_dir: Path) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def llama_greedy(run: LlamaRun, ids: list[int], n: int) -> list[int]:
    sequence = list(ids)
    for _ in range(n):
        sequence.append(int(run.logits(sequence)[-1].argmax()))
    return sequence[len(ids) :]


@pytest.mark.slow
def test_smollm2_converts_to_the_tensors_of_llama_cpp_s_own_file(smollm2, tmp_path):
    """The shipped GGUF came from llama.cpp's converter; transformers read it back (undoing the q/k permutation).
    Converting that checkpoint here and re-quantizing the shipped file to the same type give the same bytes in
    every tensor: the permutation, names, shapes and tokenizer are llama.cpp's."""
    model_dir, shipped = smollm2
    ours = write_llm_gguf(model_dir, tmp_path / "ours.gguf", "q8_0")
    theirs = requantize_gguf(shipped, tmp_path / "theirs.gguf", "q8_0")
    our_tensors = {t.name: t for t in GGUFReader(ours).tensors}
    their_tensors = {t.name: t for t in GGUFReader(theirs).tensors}
    assert our_tensors.keys() == their_tensors.keys() and len(our_tensors) == 272
    for name, tensor in our_tensors.items():
        assert tensor.tensor_type == their_tensors[name].tensor_type, name
        assert np.array_equal(tensor.data, their_tensors[name].data), name
    our_fields, their_fields = fields(ours), fields(theirs)
    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "padding_token_id"):
        assert our_fields[f"tokenizer.ggml.{key}"] == their_fields[f"tokenizer.ggml.{key}"], key
    assert our_fields["tokenizer.chat_template"] == their_fields["tokenizer.chat_template"]


@pytest.mark.slow
def test_smollm2_f16_in_llama_cpp_answers_as_transformers_does(llama, smollm2, tmp_path, one_thread):
    model_dir, _ = smollm2
    path = write_llm_gguf(model_dir, tmp_path / "smollm2-f16.gguf", "f16")
    ids = smollm2_prompt(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        reply = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    run = LlamaRun(llama, path)
    try:
        logits = run.logits(ids)
        reference = hf_logits(model, ids)
        assert relative_error(logits, reference) < 4e-3  # measured 2.1e-3 (logits up to 38)
        assert (logits.argmax(-1) == reference.argmax(-1)).all()
        assert llama_greedy(run, ids, 8) == reply
        assert "Paris" in tokenizer.decode(reply)
        for text in TEXTS:
            assert run.tokenize(text) == tokenizer(text)["input_ids"], text
    finally:
        run.close()


@pytest.mark.slow
def test_shipped_smollm2_requantized_to_q4_0_keeps_its_metadata_and_answers(llama, smollm2, tmp_path):
    model_dir, shipped = smollm2
    path = requantize_gguf(shipped, tmp_path / "smollm2-q4_0.gguf", "q4_0")
    before, after = fields(shipped), fields(path)
    assert (before.pop("general.file_type"), after.pop("general.file_type")) == (3, 2)  # MOSTLY_Q4_1 -> MOSTLY_Q4_0
    assert after == before
    types = [t.tensor_type.name for t in GGUFReader(path).tensors]
    # The Q4_1 weights become Q4_0; the tied embedding (the output projection too) stays Q8_0, norms F32.
    assert {name: types.count(name) for name in set(types)} == {"Q4_0": 210, "Q8_0": 1, "F32": 61}
    run = LlamaRun(llama, path)
    try:
        reply = llama_greedy(run, smollm2_prompt(model_dir), 8)
    finally:
        run.close()
    assert "Paris" in AutoTokenizer.from_pretrained(model_dir).decode(reply)
    # Its own type again: every tensor copied byte for byte.
    same = requantize_gguf(shipped, tmp_path / "smollm2-q4_1.gguf", "q4_1")
    original = {t.name: t.data for t in GGUFReader(shipped).tensors}
    assert all(np.array_equal(t.data, original[t.name]) for t in GGUFReader(same).tensors)
