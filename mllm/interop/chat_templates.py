"""Prompt formats -> chat templates: the source checkpoint's prompt layout as a Jinja template our processor renders.

A llava-hf processor template renders list content (`{"type": "image"}` parts); BLIP-2 / InstructBLIP take a plain
prompt. Both become a template over string content with `<image>` placeholders that reproduces the source's token
layout exactly, and the reverse (`string_template`) for exports.
"""

from __future__ import annotations

import json
import warnings

from transformers import PreTrainedTokenizerBase


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
