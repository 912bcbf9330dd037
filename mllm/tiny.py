"""Tiny random-weight checkpoints, written to a directory and loaded by path exactly as a hub id would be.

The tests and the benchmarks build their small models here: a byte-level BPE tokenizer trained offline
on a few sentences (with a ChatML template), a random LLaMA and a random CLIP or SigLIP vision tower. Nothing is
downloaded; the sizes are arguments so a benchmark can build a larger one with the same code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from mllm.templates import NAMED_TEMPLATES

CORPUS = [
    "what color is the circle",
    "the circle is red and the square is blue",
    "how many objects are there in the image",
    "there are three objects: a red circle, a green triangle and a blue square",
    "describe the image in one sentence please",
    "hello, how are you today? i am fine, thank you.",
    "yes no left right top bottom middle center small large",
    "The quick brown fox jumps over the lazy dog 0123456789",
]

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
TINY_CLIP = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)


def build_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained offline on `CORPUS`, with a ChatML template; saved to `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = NAMED_TEMPLATES["chatml"]
    fast.save_pretrained(directory)
    return fast


def build_llama(directory: Path, tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0, **sizes) -> Path:
    """A random LlamaForCausalLM (`TINY_LLAMA` unless `sizes` say otherwise) with `tokenizer` (default: a new
    `build_tokenizer`) saved in `directory`."""
    if tokenizer is None:
        tokenizer = build_tokenizer(directory)
    else:
        tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **{**TINY_LLAMA, **sizes},
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def build_clip(directory: Path, seed: int = 0, **sizes) -> Path:
    """A random CLIPVisionModel (`TINY_CLIP` unless `sizes` say otherwise) and its image processor in `directory`."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(**{**TINY_CLIP, **sizes})
    CLIPVisionModel(config).save_pretrained(directory)
    side = config.image_size
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        directory
    )
    return directory


def build_siglip(directory: Path, seed: int = 0, **sizes) -> Path:
    """A random SiglipVisionModel (`TINY_CLIP`'s sizes unless `sizes` say otherwise) and its image processor."""
    from transformers import SiglipImageProcessor

    torch.manual_seed(seed)
    config = SiglipVisionConfig(**{**TINY_CLIP, **sizes})
    SiglipVisionModel(config).save_pretrained(directory)
    side = config.image_size
    SiglipImageProcessor(size={"height": side, "width": side}).save_pretrained(directory)
    return directory
