"""Shared fixtures: tiny random checkpoints built here and loaded by path, as a hub id would be."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

# Tests never reach a hub; any attempt fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

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


def build_tokenizer(directory: Path):
    """A small byte-level BPE tokenizer trained offline on a few sentences, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    return fast


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    directory = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    CLIPVisionModel(config).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_config(tiny_llama_dir, tiny_clip_dir):
    from mllm.config import LLMConfig, MLLMConfig, VisionConfig

    return MLLMConfig(
        vision=VisionConfig(kind="hf", path=str(tiny_clip_dir)),
        llm=LLMConfig(path=str(tiny_llama_dir)),
        template="auto",
    )


@pytest.fixture
def tiny_model(tiny_config):
    from mllm.model import MLLM

    torch.manual_seed(0)
    return MLLM.build(tiny_config, device="cpu").eval()


@pytest.fixture
def images() -> list[Image.Image]:
    """Two small distinct RGB images."""
    return [Image.new("RGB", (40, 30), (220, 30, 30)), Image.new("RGB", (24, 24), (30, 30, 220))]
