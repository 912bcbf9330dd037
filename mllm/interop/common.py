"""Shared pieces of the importers: recognising a checkpoint, reading its tensors, loading its LLM half,
and turning its prompt format into a chat template our processor can render.

A transformers multimodal directory is recognised by its `config.json` (`model_type`, then `architectures`),
never by its folder name. Its weights are read from safetensors only (no pickle).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from mllm.config import LLMConfig
from mllm.llm import compute_dtype, quantization_config

# config.json `model_type` / architecture -> our name for the format.
FORMATS: dict[str, str] = {"llava": "llava", "blip-2": "blip2", "instructblip": "instructblip"}
ARCHITECTURES: dict[str, str] = {
    "LlavaForConditionalGeneration": "llava",
    "Blip2ForConditionalGeneration": "blip2",
    "InstructBlipForConditionalGeneration": "instructblip",
}

# Where each format keeps its LLM: checkpoint-key regex -> AutoModelForCausalLM key. Both the layout written
# by transformers < 5 / llava-hf on the hub (`language_model.model.*`, `language_model.lm_head.*`) and the
# transformers 5 in-memory layout (`model.language_model.*`, `lm_head.*`) are covered.
LLM_KEY_MAPPINGS: dict[str, dict[str, str]] = {
    "llava": {
        r"^language_model\.model\.": "model.",
        r"^language_model\.lm_head\.": "lm_head.",
        r"^model\.language_model\.": "model.",
    },
    "blip2": {r"^language_model\.": ""},
    "instructblip": {r"^language_model\.": ""},
}


def read_hf_config(path: str | Path) -> dict | None:
    """The parsed `config.json` of a local directory, or None if there is none."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from e


def detect_format(path: str | Path) -> str | None:
    """`llava`, `blip2` or `instructblip` for a transformers checkpoint directory of that kind, else None."""
    config = read_hf_config(path)
    if config is None:
        return None
    if config.get("model_type") in FORMATS:
        return FORMATS[config["model_type"]]
    for arch in config.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    return None


def replace_dir(finished: Path, out: Path) -> None:
    """Move the finished directory to `out`. An existing `out` is replaced only if it is empty or a previous
    output (an mllm checkpoint or a Llava export), never an unrelated folder or a source checkpoint."""
    if out.exists():
        ours = (out / "mllm_config.json").is_file() or (read_hf_config(out) or {}).get("model_type") == "llava"
        if not out.is_dir() or (any(out.iterdir()) and not ours):
            raise FileExistsError(f"{out} exists and is not a previous mllm output; choose another output directory")
    from mllm.checkpoint import swap_in  # lazy: mllm.checkpoint imports this module lazily too

    swap_in(finished, out)


def forget_key_mapping(model: torch.nn.Module) -> torch.nn.Module:
    """Let `save_pretrained` write a model loaded through a `key_mapping` in its class's standard layout.

    transformers records the mapping used at load time and reverses it on save; ours map a composite
    checkpoint's prefixes away (not reversible), and the standalone model should not get them back anyway.
    """
    for module in model.modules():
        if hasattr(module, "_weight_conversions"):
            module._weight_conversions = None
    return model


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports: loading one half of a composite checkpoint leaves the other half
    "unexpected" by design (missing keys are checked by us instead)."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def safetensors_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory; pickled weights are refused."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / name for name in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if list(path.glob("*.bin")):
        raise ValueError(
            f"{path} holds only pickled weights (*.bin); mllm reads safetensors only. Re-save it once with "
            "`Model.from_pretrained(path).save_pretrained(path, safe_serialization=True)`"
        )
    raise FileNotFoundError(f"{path} has no model.safetensors (or model.safetensors.index.json)")


def read_tensors(path: str | Path, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint whose key passes `keep`, read lazily shard by shard."""
    out = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if keep(key):
                    out[key] = f.get_tensor(key)
    return out


def strip_prefix(tensors: dict[str, torch.Tensor], marker: str) -> dict[str, torch.Tensor]:
    """Keys after `marker` (e.g. `multi_modal_projector.`), whatever layout prefix comes before it."""
    return {key.split(marker, 1)[1]: value for key, value in tensors.items() if marker in key}


def source_dtype(config: PretrainedConfig) -> torch.dtype:
    """The dtype the checkpoint's weights were saved in (float32 if it does not say)."""
    for cfg in (getattr(config, "text_config", None), config):
        dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return torch.float32


def check_decoder_only(path: str | Path, text_config: PretrainedConfig) -> None:
    if getattr(text_config, "is_encoder_decoder", False):
        raise ValueError(
            f"{path} uses an encoder-decoder LLM ({text_config.model_type}, e.g. the Flan-T5 BLIP-2 models); "
            "mllm needs a decoder-only causal LM: use an OPT / LLaMA-class checkpoint (e.g. Salesforce/blip2-opt-2.7b)"
        )


def load_composite_llm(
    path: str | Path,
    fmt: str,
    text_config: PretrainedConfig,
    cfg: LLMConfig,
    device: str | torch.device,
    dtype: torch.dtype | None = None,
):
    """The LLM half of a Llava / BLIP-2 / InstructBLIP checkpoint as a plain AutoModelForCausalLM.

    Loaded by transformers itself (sharding, quantization, tied weights) with a key mapping, so only the
    LLM's tensors are materialised. `dtype` overrides the compute dtype (conversion keeps the source dtype).
    """
    check_decoder_only(path, text_config)
    dtype = dtype or compute_dtype(cfg, device)
    kwargs = dict(
        config=text_config,
        key_mapping=LLM_KEY_MAPPINGS[fmt],
        dtype=dtype,
        trust_remote_code=False,
        output_loading_info=True,
    )
    quant = quantization_config(cfg, dtype)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": str(device)})
    with quiet_transformers():
        model, info = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if missing := sorted(info["missing_keys"]):
        raise ValueError(f"{path} lacks {len(missing)} weights of its LLM, e.g. {missing[:3]}")
    if quant is None:
        model.to(device)
    return model.eval()


# ---- prompt formats -> chat templates ---------------------------------------------------------------
def jinja_str(text: str) -> str:
    """A Jinja string literal for `text` (JSON escaping is valid Jinja)."""
    return json.dumps(text)


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> str:
    """The special tokens the tokenizer puts in front of a text by itself (e.g. LLaMA's `<s>`), as text.

    transformers' processors tokenize prompts with `add_special_tokens=True`; our processor tokenizes the
    rendered template with `add_special_tokens=False`, so the template has to write these itself.
    """
    probe = "Hello world"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    start = next((i for i in range(len(with_special) - len(plain) + 1) if with_special[i : i + len(plain)] == plain), 0)
    prefix = "".join(tokenizer.convert_ids_to_tokens(with_special[:start]))
    if (
        prefix
        and tokenizer(prefix + probe, add_special_tokens=False)["input_ids"] != with_special[: start + len(plain)]
    ):
        # e.g. a SentencePiece tokenizer that adds its word-start marker only at the very start of the text
        warnings.warn(
            f"this tokenizer does not tokenize {prefix!r} + text as it tokenizes text after adding {prefix!r} itself; "
            "the first prompt token may differ from the source processor's",
            stacklevel=2,
        )
    return prefix


def parts_template(template: str, image_token: str) -> str:
    """Wrap a template written for list content (`[{"type": "image"}, {"type": "text", ...}]`, as llava-hf
    processors ship them) so that it renders our string content, where each image is `image_token` + newline.

    The wrapper rebuilds the parts from the string and rebinds `messages`; the original template follows
    unchanged. It writes no text itself.
    """
    tok = jinja_str(image_token)
    return (
        "{%- set ns = namespace(messages=[]) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}"
        "{%- set parts = namespace(items=[]) -%}"
        f"{{%- for piece in message['content'].split({tok}) -%}}"
        "{%- if not loop.first -%}"
        "{%- set parts.items = parts.items + [{'type': 'image'}] -%}"
        "{%- if piece.startswith('\\n') -%}{%- set piece = piece[1:] -%}{%- endif -%}"
        "{%- endif -%}"
        "{%- if piece -%}{%- set parts.items = parts.items + [{'type': 'text', 'text': piece}] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set ns.messages = ns.messages + [{'role': message['role'], 'content': parts.items}] -%}"
        "{%- else -%}"
        "{%- set ns.messages = ns.messages + [message] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = ns.messages %}" + template
    )


def string_template(template: str, image_token: str) -> str:
    """The reverse of `parts_template`: wrap one of our templates (string content) so that it also renders
    list content (what `AutoProcessor.apply_chat_template`, vLLM and `transformers serve` pass).

    Parts are joined exactly as our processor joins them: an image becomes `image_token` + newline, text is
    kept, and trailing newlines are stripped.
    """
    tok = jinja_str(image_token + "\n")
    return (
        "{%- set ns = namespace(messages=[]) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}"
        "{%- set ns.messages = ns.messages + [message] -%}"
        "{%- else -%}"
        "{%- set text = namespace(value='') -%}"
        "{%- for part in message['content'] -%}"
        f"{{%- if part['type'] in ('image', 'image_url') -%}}{{%- set text.value = text.value + {tok} -%}}"
        "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set ns.messages = ns.messages + [{'role': message['role'], 'content': text.value.rstrip('\\n')}] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = ns.messages %}" + template
    )


def renders_images(tokenizer: PreTrainedTokenizerBase, template: str, image_token: str) -> bool:
    """Whether `template` keeps both the text and the image placeholder of a string-content probe."""
    probe = [{"role": "user", "content": f"{image_token}\nzqx probe"}]
    try:
        text = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that fails on string content (e.g. iterates over parts)
        return False
    return image_token in text and "zqx probe" in text


def chat_template_for(tokenizer: PreTrainedTokenizerBase, template: str, image_token: str) -> str:
    """A template our processor can render, equivalent to `template` applied by the source processor.

    List-content templates get the `parts_template` wrapper; the tokenizer's automatic special prefix
    (e.g. BOS) is written by the template unless the template already writes it.
    """
    if not renders_images(tokenizer, template, image_token):
        wrapped = parts_template(template, image_token)
        if not renders_images(tokenizer, wrapped, image_token):
            raise ValueError(
                "the checkpoint's chat template renders neither string nor list message content with an image; "
                "pass a named template instead (--template chatml | vicuna_v1 | plain)"
            )
        template = wrapped
    prefix = special_prefix(tokenizer)
    probe = [{"role": "user", "content": "q"}]
    rendered = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False, add_generation_prompt=True)
    if prefix and not rendered.startswith(prefix):
        template = "{{- " + jinja_str(prefix) + " }}" + template
    return template


def prompt_template(tokenizer: PreTrainedTokenizerBase, image_token: str) -> str:
    """BLIP-2 / InstructBLIP's prompt format: every image's query tokens first, then the tokenizer's own prefix
    (OPT's `</s>`, LLaMA's `<s>`), then the text of the turns as written (a prompt such as
    "Question: what is this? Answer:"). An assistant turn ends with EOS, the model's stop token.
    """
    tok = jinja_str(image_token)
    return (
        "{%- set ns = namespace(images=0) -%}"
        f"{{%- for message in messages -%}}{{%- set ns.images = ns.images + message['content'].count({tok}) -%}}"
        "{%- endfor -%}"
        f"{{{{- {tok} * ns.images -}}}}{{{{- {jinja_str(special_prefix(tokenizer))} -}}}}"
        "{%- for message in messages -%}"
        f"{{%- set text = message['content'].replace({jinja_str(image_token + chr(10))}, '').replace({tok}, '') -%}}"
        "{%- if message['role'] == 'assistant' -%}{{- text + eos_token -}}{%- else -%}{{- text -}}{%- endif -%}"
        "{%- endfor -%}"
    )
