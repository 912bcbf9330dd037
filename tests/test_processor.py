"""The processor's labels: its assistant spans are exactly those of rendering prefixes, for templates of every
kind, found in time linear in the turns (one marked render) wherever the template allows; encoding for generation
does no label work at all."""

from __future__ import annotations

import random
import time

import pytest

import mllm.processor
from mllm.errors import ContextLengthError
from mllm.image_processing import ImageProcessor
from mllm.processor import IGNORE_INDEX, SPAN_CLOSE, SPAN_OPEN, Processor
from mllm.templates import NAMED_TEMPLATES, render
from mllm.tiny import build_tokenizer

# Tokenizer ('auto') templates. SmolLM2's writes a default system prompt on the first turn (loop.first).
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3's trims every content, so a reply with whitespace at its edges renders apart from its markers.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Prefix-stable, but later replies open unlike the first: the probed opening does not fit them.
DRIFTING = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT:' + (' ' if loop.index < 3 else '  ') }}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Consecutive replies written as one turn, which no probe conversation has: not prefix-stable there, as a reply's
# own opening (one 'ASSISTANT: ' before the run) or ending (one end-of-sequence after it) shows.
JOINED_OPENING = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if loop.first or loop.previtem['role'] != 'assistant' %}{{ 'ASSISTANT: ' }}{% endif %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
JOINED_ENDING = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] }}"
    "{% if loop.last or loop.nextitem['role'] != 'assistant' %}{{ eos_token }}{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Replies trimmed, with nothing around them: a reply with whitespace at its edges is placed by its markers where
# the plain render does not have it, and no opening or ending text tells.
TRIMMED = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ message['content'] | trim }}"
    "{% else %}{{ message['content'] }}{% endif %}{% endfor %}"
)
# Not prefix-stable: every turn's rendering depends on the length of the whole conversation.
COUNTING = "{{ messages | length }}\n" + NAMED_TEMPLATES["chatml"]
# Not prefix-stable where a system prompt comes with several user turns: Mistral's puts it in the last one.
MISTRAL = (
    "{% set last = namespace(user=-1) %}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% set last.user = loop.index0 %}{% endif %}{% endfor %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% if loop.index0 == last.user and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
    "{% endif %}{{ message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

TEMPLATES = {
    **NAMED_TEMPLATES,
    "smollm2": SMOLLM2,
    "llama3": LLAMA3,
    "drifting": DRIFTING,
    "joined_opening": JOINED_OPENING,
    "joined_ending": JOINED_ENDING,
    "trimmed": TRIMMED,
    "counting": COUNTING,
    "mistral": MISTRAL,
}
# Templates that frame every reply as in the probe: only a marker in a message keeps them from the marked render.
EXACT_FRAME = ("chatml", "vicuna_v1", "plain", "smollm2")
# Templates whose probe conversations give the same spans both ways: their spans come from the marked render
# wherever a conversation passes its own checks.
MARKED = EXACT_FRAME + ("llama3", "joined_opening", "joined_ending", "trimmed")

TEXTS = [
    "what color is the circle",
    "red",
    "",
    " ",
    "\n",
    "  leading spaces",
    "trailing newline\n",
    "\ttab\t",
    "naïve café",
    "日本語のテキスト",
    "🙂👍🏽",
    "e\u0301 combining",
    "ASSISTANT: USER:",
    "<|im_end|>",
    "a </s> b",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _processor(tokenizer, template: str) -> Processor:
    image_processor = ImageProcessor(image_size=16, image_mean=(0.0,) * 3, image_std=(1.0,) * 3)
    return Processor(tokenizer, image_processor, template, "<image>", tokens_per_image=3, max_images=64)


def prefix_spans(processor: Processor, flat: list[dict], text: str) -> list[tuple[int, int]]:
    """The reference: each reply's span from rendering the conversation before it (with the generation prompt)
    and up to it, two renders per reply."""
    spans = []
    for i, message in enumerate(flat):
        if message["role"] != "assistant":
            continue
        before = render(processor.tokenizer, processor.template, flat[:i], add_generation_prompt=True) if i else ""
        upto = render(processor.tokenizer, processor.template, flat[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError("the chat template is not prefix-stable")
        spans.append((len(before), len(upto)))
    return spans


def reference_labels(processor: Processor, messages: list[dict], images: list, add_generation_prompt: bool) -> list:
    """The labels of the prefix-render spans, each token labelled by where it starts."""
    flat, _ = processor._flatten(messages, images)
    text = render(processor.tokenizer, processor.template, flat, add_generation_prompt)
    spans = prefix_spans(processor, flat, text)
    enc = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels, span_i = [], 0
    for token_id, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"]):
        while span_i < len(spans) and start >= spans[span_i][1]:
            span_i += 1
        supervised = span_i < len(spans) and spans[span_i][0] <= start < spans[span_i][1]
        if token_id == processor.image_token_id:
            labels += [IGNORE_INDEX] * processor.tokens_per_image
        else:
            labels.append(token_id if supervised else IGNORE_INDEX)
    return labels


def random_conversation(rng: random.Random) -> tuple[list[dict], list]:
    """Messages and the images for their placeholders: any order of roles (opening with the assistant too),
    images as parts or `<image>` placeholders, unicode, edge whitespace, empty replies, now and then a marker."""
    texts = TEXTS + ([SPAN_OPEN + "x" + SPAN_CLOSE, SPAN_CLOSE] if rng.random() < 0.1 else [])
    inline = rng.random() < 0.5
    messages, images = [], []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(texts)})
    for _ in range(rng.randint(1, 8)):
        role = rng.choice(["user", "assistant", "assistant", "user", "system"] if messages else ["user", "assistant"])
        text = "".join(rng.choice(texts) for _ in range(rng.randint(0, 3)))
        n_images = rng.choice([0, 0, 1, 2]) if role == "user" else 0
        if inline and n_images:
            parts = [{"type": "image", "image": f"{len(images) + k}.png"} for k in range(n_images)]
            content = parts + [{"type": "text", "text": text}]
        else:
            content = "<image>\n" * n_images + text
        images += [f"{len(images) + k}.png" for k in range(n_images)]
        messages.append({"role": role, "content": content})
    return messages, [] if inline else images


def _outcome(compute, *args):
    """`compute(*args)`, or the kind of error it raised."""
    try:
        return compute(*args)
    except ValueError as e:
        return ("not prefix-stable" in str(e), type(e))


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_spans_and_labels_equal_the_prefix_renders(tokenizer, name):
    processor = _processor(tokenizer, TEMPLATES[name])
    rng = random.Random(name)
    marked = 0
    for _ in range(150):
        messages, images = random_conversation(rng)
        generation = rng.random() < 0.3
        flat, _ = processor._flatten(messages, images)
        text = render(tokenizer, processor.template, flat, generation)
        expected = _outcome(prefix_spans, processor, flat, text)
        assert _outcome(processor._supervised_spans, flat, text, generation) == expected, messages
        if isinstance(expected, tuple):  # an error
            continue
        encoded = processor.encode(messages, images, add_generation_prompt=generation)
        assert encoded.labels.tolist() == reference_labels(processor, messages, images, generation), messages
        replies = [i for i, m in enumerate(flat) if m["role"] == "assistant"]
        if replies and processor._marks_replies:
            uses_markers = processor._marked_spans(flat, text, replies, generation) is not None
            holds_marker = any(SPAN_OPEN in m["content"] or SPAN_CLOSE in m["content"] for m in flat)
            assert uses_markers == (not holds_marker) or name not in EXACT_FRAME
            marked += uses_markers
    # The equality above is that of the marked render, not of the prefix renders it falls back to.
    assert processor._marks_replies == (name in MARKED)
    if name in MARKED:
        assert marked > 50


def test_a_template_that_is_not_prefix_stable_is_refused(tokenizer):
    processor = _processor(tokenizer, COUNTING)
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(ValueError, match="not prefix-stable"):
        processor.encode(conversation)


def test_generation_encodes_without_labels_and_with_the_same_ids(tokenizer, monkeypatch):
    processor = _processor(tokenizer, NAMED_TEMPLATES["vicuna_v1"])
    messages = _pairs(5) + [
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "and?"}]}
    ]
    renders = _count_renders(monkeypatch)
    prompt = processor.encode(messages, add_generation_prompt=True, labels=False)
    assert renders() == 1  # the conversation itself, no span search
    trained = processor.encode(messages, add_generation_prompt=True)
    assert prompt.input_ids.tolist() == trained.input_ids.tolist()
    assert prompt.labels.shape == prompt.input_ids.shape and prompt.num_supervised == 0
    assert trained.num_supervised > 0 and prompt.images == trained.images == ["a.png"]


def test_renders_do_not_grow_with_the_turns(tokenizer, monkeypatch):
    processor = _processor(tokenizer, NAMED_TEMPLATES["vicuna_v1"])
    processor.encode(_pairs(1))  # probes the template once
    renders = _count_renders(monkeypatch)
    per_encode = []
    for n in (2, 20, 200):
        before = renders()
        processor.encode(_pairs(n))
        per_encode.append(renders() - before)
    assert per_encode == [2, 2, 2]  # the conversation, and once more with its replies marked


@pytest.mark.parametrize("name", ["chatml", "vicuna_v1"])
def test_encoding_time_is_linear_in_the_turns(tokenizer, name):
    """2,000 turns (1,000 pairs) take about four times as long as 500 (rendering prefixes took sixteen times)."""
    processor = _processor(tokenizer, NAMED_TEMPLATES[name])
    small, large = _pairs(250), _pairs(1000)
    processor.encode(small)  # warm: the probes and the compiled template

    def seconds(messages) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            processor.encode(messages)
            best = min(best, time.perf_counter() - start)
        return best

    assert seconds(large) / seconds(small) < 8


def test_a_conversation_too_long_in_characters_is_refused_before_rendering(tokenizer, monkeypatch):
    processor = _processor(tokenizer, NAMED_TEMPLATES["chatml"])
    processor.max_length = 16
    renders = _count_renders(monkeypatch)
    with pytest.raises(ContextLengthError):
        processor.encode(_pairs(2000), add_generation_prompt=True, labels=False)
    assert renders() == 0


def _pairs(n: int) -> list[dict]:
    """n question/answer pairs."""
    messages = []
    for i in range(n):
        messages.append({"role": "user", "content": f"question {i}: what color is the circle?"})
        messages.append({"role": "assistant", "content": f"answer {i}: the circle is red."})
    return messages


def _count_renders(monkeypatch):
    """Count the processor's template renders from now on; returns the counter."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return render(*args, **kwargs)

    monkeypatch.setattr(mllm.processor, "render", counted)
    return lambda: len(calls)
