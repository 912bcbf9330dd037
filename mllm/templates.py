"""Chat templates: one Jinja source of truth for training label masks and for serving.

`auto` uses the tokenizer's own template. Named templates cover LLMs that ship none (or when a
recipe wants a fixed one, like LLaVA's `plain` alignment format). The resolved Jinja text is
stored in every checkpoint, so a model is always served with the template it was trained on.
Templates are never picked by sniffing a model's name.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# Messages reaching a template always have string content: image parts are already placeholders.
NAMED_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # LLaVA-1.5 / Vicuna v1: "USER: ... ASSISTANT: ...</s>".
    "vicuna_v1": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
        "{% else %}{{ 'A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human\\'s questions. ' }}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
        "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    # LLaVA stage-1 alignment: the image, then the caption, nothing else.
    "plain": (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% elif message['role'] == 'user' %}{{ message['content'] }}{% endif %}"
        "{% endfor %}"
    ),
}


def resolve_template(name: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The Jinja text for `name`: `auto` (the tokenizer's own) or a named template."""
    if name == "auto":
        if not tokenizer.chat_template:
            raise ValueError(
                "template='auto' but this tokenizer has no chat template; "
                f"set template to one of: {', '.join(NAMED_TEMPLATES)}"
            )
        return tokenizer.chat_template
    try:
        return NAMED_TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; use 'auto' or one of: {', '.join(NAMED_TEMPLATES)}") from None


def render(tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


PROBE_QUESTION = [{"role": "user", "content": "q"}]
PROBE_REPLY = "\x00reply\x00"  # no real reply holds NULs, so it is found where the template put it


def _probe_turn(tokenizer: PreTrainedTokenizerBase, template: str) -> str:
    """A question and the probe reply, rendered as a finished conversation."""
    reply = {"role": "assistant", "content": PROBE_REPLY}
    return render(tokenizer, template, PROBE_QUESTION + [reply], False)


def end_of_turn_text(tokenizer: PreTrainedTokenizerBase, template: str) -> str:
    """What the template writes right after an assistant reply (e.g. '<|im_end|>\\n').

    Found by rendering a probe conversation, so it works for any template.
    """
    text = _probe_turn(tokenizer, template)
    return text[text.index(PROBE_REPLY) + len(PROBE_REPLY) :]


def reply_opening(tokenizer: PreTrainedTokenizerBase, template: str) -> tuple[str, str] | None:
    """What the template writes before a reply: the generation prompt, then what a written reply adds before its
    content (vicuna_v1: 'ASSISTANT:' and ' '; chatml: '<|im_start|>assistant\\n' and ''). None where the
    generation prompt is not how a written reply begins.

    Found by rendering a probe conversation, so it works for any template.
    """
    question = render(tokenizer, template, PROBE_QUESTION, False)
    asked = render(tokenizer, template, PROBE_QUESTION, True)
    text = _probe_turn(tokenizer, template)
    if not (asked.startswith(question) and text.startswith(asked)):
        return None
    return asked[len(question) :], text[len(asked) : text.index(PROBE_REPLY)]
