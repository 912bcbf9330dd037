"""Processor: messages + images -> tensors. Strings and templates live here and only here.

A message is `{"role": "system"|"user"|"assistant", "content": str | list[part]}` with parts
`{"type": "text", "text": ...}` and `{"type": "image", "image": path | bytes | PIL.Image}`.
String content may carry `<image>` placeholders instead (LLaVA data); their images are then
passed separately, in order. Each placeholder becomes `tokens_per_image` image-token ids.
Labels keep the assistant spans only (the reply and the template's end-of-turn text, so the
model learns to stop); everything else is IGNORE_INDEX. Encoding a prompt to generate from asks for no labels
(`labels=False`): locating the assistant spans is then skipped.

With a `qformer_tokenizer` (an InstructBLIP-style Q-Former that reads text), each image also gets its
instruction: the text of the message holding it, placeholders removed (what InstructBlipProcessor is given),
tokenized with the Q-Former's own (BERT) tokenizer.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jinja2 import TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mllm.config import CONFIG_FILE, MLLMConfig
from mllm.errors import CheckpointError, ContextLengthError, MessageError, TooManyImagesError
from mllm.image_processing import ImageProcessor
from mllm.templates import end_of_turn_text, render, reply_opening

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"  # checkpoint subfolder of the Q-Former's tokenizer
TEMPLATE_FILE = "template.jinja"
IMAGE_PROCESSOR_FILE = "image_processor.json"
# Private-use code points around each reply in the marked render; a conversation holding one is not marked.
SPAN_OPEN, SPAN_CLOSE = "\ue000", "\ue001"
MARKER = re.compile(f"[{SPAN_OPEN}{SPAN_CLOSE}]")
# Role orders on which a template's marked spans must equal its prefix renders' before they are used: a template
# whose later turns change earlier ones (a system prompt moved into the last user turn) shows it on them.
PROBE_CONVERSATIONS = (
    ("user", "assistant", "user", "assistant", "user"),
    ("system", "user", "assistant", "user", "assistant", "user", "assistant"),
    ("assistant", "user", "assistant"),
)


@dataclass
class Encoded:
    input_ids: torch.Tensor  # (L,) long, image slots hold image_token_id
    labels: torch.Tensor  # (L,) long, IGNORE_INDEX outside assistant spans
    images: list = field(default_factory=list)  # image sources, in placeholder order
    qformer_ids: list[list[int]] | None = None  # per image: its instruction's Q-Former ids (T_i,); None: no text

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class Processor:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: ImageProcessor,
        template: str,
        image_token: str,
        tokens_per_image: int,
        max_images: int = 8,
        max_length: int | None = None,
        qformer_tokenizer: PreTrainedTokenizerBase | None = None,
        qformer_max_length: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.image_token = image_token
        self.tokens_per_image = tokens_per_image
        self.max_images = max_images
        self.max_length = max_length or tokenizer_limit(tokenizer)
        # The placeholder must be one token so expansion is a plain id substitution. Its id may lie
        # past the LLM's vocabulary: the model overwrites those embeddings before the LLM sees them.
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.stop_token_ids = self._stop_token_ids()
        self.qformer_tokenizer = qformer_tokenizer
        self.qformer_max_length = qformer_max_length  # the Q-Former's position embeddings bound an instruction
        if qformer_tokenizer is not None and qformer_tokenizer.pad_token_id is None:
            raise ValueError("the Q-Former tokenizer needs a pad token (BERT's [PAD]) to batch instructions")

    @classmethod
    def for_model(
        cls,
        config: MLLMConfig,
        tokenizer: PreTrainedTokenizerBase,
        template: str,
        image_processor: ImageProcessor,
        tokens_per_image: int,
        qformer_tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> Processor:
        """The processor of a model with `config`; `qformer_tokenizer` is required exactly when the connector
        reads text."""
        reads_text = config.connector.qformer_text_input
        if reads_text and qformer_tokenizer is None:
            raise CheckpointError(
                "connector.qformer_text_input is set, so the model needs the Q-Former's tokenizer for the "
                f"instructions (an mllm checkpoint keeps it in {QFORMER_TOKENIZER_DIR}/)"
            )
        if qformer_tokenizer is not None and not reads_text:
            raise CheckpointError("a qformer_tokenizer was given but connector.qformer_text_input is false")
        return cls(
            tokenizer,
            image_processor,
            template,
            config.image_token,
            tokens_per_image,
            config.max_images,
            max_length=config.context_length,
            qformer_tokenizer=qformer_tokenizer,
            qformer_max_length=config.connector.qformer_max_text_positions if reads_text else None,
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Processor:
        """The processor of an mllm checkpoint directory, on its own: no weights are loaded."""
        directory = Path(directory)
        config = MLLMConfig.load(directory / CONFIG_FILE)
        if config.tokens_per_image is None:
            raise CheckpointError(f"{directory / CONFIG_FILE} does not say tokens_per_image; re-save the checkpoint")
        settings = json.loads((directory / IMAGE_PROCESSOR_FILE).read_text())
        image_processor = ImageProcessor(
            image_size=settings["image_size"],
            image_mean=tuple(settings["image_mean"]),
            image_std=tuple(settings["image_std"]),
            resize_mode=settings["resize_mode"],
        )
        tokenizer, template, qformer_tokenizer = read_text_parts(directory, config)
        return cls.for_model(config, tokenizer, template, image_processor, config.tokens_per_image, qformer_tokenizer)

    # ---- messages -> text -------------------------------------------------------------------
    def _flatten(self, messages: list[dict], images: list | None) -> tuple[list[dict], list]:
        """String-content messages for the template, plus the image sources in placeholder order."""
        if not isinstance(messages, list) or not messages:
            raise MessageError("messages must be a non-empty list of {'role', 'content'} dicts")
        flat, inline = [], []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise MessageError(f"message {i} must be a dict with 'role' and 'content', got {message!r:.80}")
            if message["role"] not in ROLES:
                raise MessageError(f"message {i} has role {message['role']!r}; allowed: {', '.join(ROLES)}")
            content = message["content"]
            if isinstance(content, list):
                pieces = []
                for j, part in enumerate(content):
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind == "text":
                        pieces.append(_checked_text(part.get("text"), f"message {i}, part {j}"))
                    elif kind == "image":
                        pieces.append(self.image_token + "\n")
                        if part.get("image") is not None:
                            inline.append(part["image"])
                    else:
                        raise MessageError(
                            f"message {i} has a content part of unknown type {kind!r}; use text or image"
                        )
                content = "".join(pieces).rstrip("\n") if pieces else ""
            elif isinstance(content, str):
                _checked_text(content, f"message {i}")
            else:
                raise MessageError(f"message {i} content must be a string or a list of parts")
            flat.append({"role": message["role"], "content": content})
        if inline and images:
            raise MessageError("give images either inline in the messages or through `images`, not both")
        sources = inline or list(images or [])
        placeholders = sum(m["content"].count(self.image_token) for m in flat)
        if placeholders != len(sources):
            raise MessageError(
                f"the conversation has {placeholders} {self.image_token} placeholder(s) but {len(sources)} image(s); "
                f"each image needs exactly one {self.image_token} (or image part) in the text"
            )
        if len(sources) > self.max_images:
            raise TooManyImagesError(
                f"the conversation has {len(sources)} images; this model takes at most {self.max_images} "
                "(start a new conversation, or raise max_images in mllm_config.json)"
            )
        return flat, sources

    def encode(
        self,
        messages: list[dict],
        images: list | None = None,
        add_generation_prompt: bool = False,
        truncate: bool = False,
        *,
        labels: bool = True,
    ) -> Encoded:
        """Tokenize one conversation; image placeholders expanded, labels on assistant spans.

        `labels=False` (generation) leaves every label IGNORE_INDEX: locating the assistant spans is the costly
        part of encoding a long conversation, and a reply to generate has no use for them.
        Over `max_length`: raise (serving) or cut at the end (`truncate`, training), never inside an image.
        """
        flat, sources = self._flatten(messages, images)
        if self.max_length is not None and not truncate:
            self._check_size(flat)
        qformer_ids = self._qformer_ids(flat) if self.qformer_tokenizer is not None else None
        text = render(self.tokenizer, self.template, flat, add_generation_prompt)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=labels)
        if labels:
            spans = self._supervised_spans(flat, text, add_generation_prompt)
            supervised = _starts_inside(enc["offset_mapping"], spans)
        else:
            supervised = [False] * len(enc["input_ids"])
        ids, targets = self._expand_images(enc["input_ids"], supervised)
        if self.max_length is not None and len(ids) > self.max_length:
            if not truncate:
                raise ContextLengthError(
                    f"the conversation is {len(ids)} tokens, over this model's limit of {self.max_length}; "
                    "start a new conversation (reset) or shorten the messages"
                )
            ids, targets, sources = self._truncate(ids, targets, sources)
            qformer_ids = None if qformer_ids is None else qformer_ids[: len(sources)]
        return Encoded(
            torch.tensor(ids, dtype=torch.long), torch.tensor(targets, dtype=torch.long), sources, qformer_ids
        )

    def _expand_images(self, token_ids: list[int], supervised: list[bool]) -> tuple[list[int], list[int]]:
        """(ids, labels): each image placeholder becomes `tokens_per_image` slots, never supervised."""
        ids, targets = [], []
        for token_id, learn in zip(token_ids, supervised):
            if token_id == self.image_token_id:
                ids.extend([token_id] * self.tokens_per_image)
                targets.extend([IGNORE_INDEX] * self.tokens_per_image)
            else:
                ids.append(token_id)
                targets.append(token_id if learn else IGNORE_INDEX)
        return ids, targets

    # ---- assistant spans ----------------------------------------------------------------------
    # A reply's span is what rendering prefixes says the assistant wrote: from the end of the conversation before
    # it, with the generation prompt, to the end of the conversation up to it (the reply and its end-of-turn
    # text). Two renders per reply make that quadratic in the turns, so the spans come from one render with every
    # reply between markers wherever that is known to agree: the markers change nothing else, each reply sits
    # between the same opening and end-of-turn text as in a probe conversation, and on probe conversations the two
    # ways give the same spans. Elsewhere the prefixes are rendered, reply by reply.
    def _supervised_spans(self, flat: list[dict], text: str, add_generation_prompt: bool) -> list[tuple[int, int]]:
        """Character spans of `text` (`flat` rendered) written by the assistant."""
        replies = [i for i, message in enumerate(flat) if message["role"] == "assistant"]
        if not replies:
            return []
        spans = self._marked_spans(flat, text, replies, add_generation_prompt) if self._marks_replies else None
        return spans if spans is not None else [self._prefix_span(flat, text, i) for i in replies]

    def _prefix_span(self, flat: list[dict], text: str, i: int) -> tuple[int, int]:
        """The span of the reply `flat[i]` in `text`, from two renders of the conversation before and up to it."""
        # A conversation may open with the assistant: nothing comes before it (templates refuse to render none).
        before = render(self.tokenizer, self.template, flat[:i], add_generation_prompt=True) if i else ""
        upto = render(self.tokenizer, self.template, flat[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError(
                "the chat template is not prefix-stable (rendering a conversation changes its earlier "
                "turns), so assistant spans can't be located; use a named template such as 'chatml'"
            )
        return len(before), len(upto)

    def _marked_spans(
        self, flat: list[dict], text: str, replies: list[int], add_generation_prompt: bool
    ) -> list[tuple[int, int]] | None:
        """The spans of the `replies` (indices in `flat`) from one render with each reply between markers, or
        None where that render can't be trusted to agree with `_prefix_span`."""
        opening, tail = self._reply_frame
        if opening is None or any(SPAN_OPEN in m["content"] or SPAN_CLOSE in m["content"] for m in flat):
            return None
        prompt, lead = opening
        marked = [
            {**m, "content": SPAN_OPEN + m["content"] + SPAN_CLOSE} if m["role"] == "assistant" else m for m in flat
        ]
        contents = _marked_contents(render(self.tokenizer, self.template, marked, add_generation_prompt), text)
        if contents is None or len(contents) != len(replies):
            return None
        spans = []
        for i, (start, end) in zip(replies, contents):
            # Framed as in the probe: the generation prompt and the lead before the reply (nothing before one that
            # opens the conversation: its span starts the text), the end-of-turn text after it.
            if (i > 0 and not text.endswith(prompt + lead, 0, start)) or not text.startswith(tail, end):
                return None
            spans.append((start - len(lead) if i > 0 else 0, end + len(tail)))
        return spans

    @functools.cached_property
    def _marks_replies(self) -> bool:
        """Whether this template's spans may come from the marked render: on each probe conversation that it
        renders, they must equal the prefix renders'. A template that rewrites earlier turns as later ones come
        (Mistral's moves the system prompt into the last user turn) can pass a conversation's own checks, not
        these."""
        for roles in PROBE_CONVERSATIONS:
            flat = [{"role": role, "content": f"{role} {k}"} for k, role in enumerate(roles)]
            replies = [k for k, role in enumerate(roles) if role == "assistant"]
            for add_generation_prompt in (False, True):
                try:
                    text = render(self.tokenizer, self.template, flat, add_generation_prompt)
                    expected = [self._prefix_span(flat, text, i) for i in replies]
                except TemplateError:
                    continue  # a conversation the template refuses (a strict role order) says nothing
                except ValueError:
                    return False  # not prefix-stable
                if self._marked_spans(flat, text, replies, add_generation_prompt) != expected:
                    return False
        return True

    @functools.cached_property
    def _reply_frame(self) -> tuple[tuple[str, str] | None, str]:
        """What the template writes before a reply (see `reply_opening`) and after it."""
        return reply_opening(self.tokenizer, self.template), end_of_turn_text(self.tokenizer, self.template)

    def _check_size(self, flat: list[dict]) -> None:
        """Refuse a conversation too long for the context from its length in characters, before rendering
        or tokenizing it: no token is longer than `_chars_per_token` characters, so more characters than
        that many per token of the limit means more tokens than the limit."""
        chars = sum(len(m["content"]) for m in flat)
        if chars > self.max_length * self._chars_per_token:
            raise ContextLengthError(
                f"the conversation is {chars:,} characters, more than this model's limit of {self.max_length} "
                "tokens can hold; start a new conversation (reset) or shorten the messages"
            )

    @functools.cached_property
    def _chars_per_token(self) -> int:
        # Twice the longest vocabulary entry: a normalizer may compose characters (NFKC), so a token can
        # cover up to about twice its own length of input.
        return 2 * max(len(token) for token in self.tokenizer.get_vocab())

    def _qformer_ids(self, flat: list[dict]) -> list[list[int]]:
        """Per image, in placeholder order, the Q-Former ids of the text of the message that holds it."""
        instructions = []
        for message in flat:
            content = message["content"]
            text = content.replace(self.image_token + "\n", "").replace(self.image_token, "")
            instructions += [text] * content.count(self.image_token)
        if not instructions:
            return []
        limit = self.qformer_max_length
        enc = self.qformer_tokenizer(instructions, truncation=limit is not None, max_length=limit)
        return [list(ids) for ids in enc["input_ids"]]

    def _truncate(self, ids: list[int], labels: list[int], sources: list) -> tuple[list, list, list]:
        cut = self.max_length
        # Back off to the start of an image span that the cut would split, and drop that image.
        while cut > 0 and ids[cut - 1] == self.image_token_id and ids[cut] == self.image_token_id:
            cut -= 1
        kept_images = sum(1 for t in ids[:cut] if t == self.image_token_id) // self.tokens_per_image
        return ids[:cut], labels[:cut], sources[:kept_images]

    # ---- batches ------------------------------------------------------------------------------
    def pixel_values(self, sources: list) -> torch.Tensor:  # (n_img, 3, S, S)
        return self.image_processor(sources)

    def image_inputs(self, encoded: Encoded, first: int = 0) -> dict[str, torch.Tensor] | None:
        """The model's image inputs for `encoded`'s images from the `first`-th on, or None if there are none:
        `pixel_values` (n, 3, S, S) and, for a text-reading Q-Former, each image's instruction (n, T)."""
        if len(encoded.images) <= first:
            return None
        inputs = {"pixel_values": self.pixel_values(encoded.images[first:])}
        if self.qformer_tokenizer is not None:
            inputs.update(self.qformer_batch(encoded.qformer_ids[first:]))
        return inputs

    def collate(self, encoded: list[Encoded]) -> dict[str, torch.Tensor]:
        """Right-pad a batch; pixel_values concatenated in row-major placeholder order."""
        longest = max(len(e.input_ids) for e in encoded)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), longest), dtype=torch.long)
        for row, e in enumerate(encoded):
            n = len(e.input_ids)
            input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = e.input_ids, e.labels, 1
        sources = [s for e in encoded for s in e.images]
        batch = {
            "input_ids": input_ids,  # (B, L)
            "attention_mask": attention_mask,  # (B, L)
            "labels": labels,  # (B, L)
            "pixel_values": self.pixel_values(sources),  # (n_img, 3, S, S)
        }
        if self.qformer_tokenizer is not None:
            batch.update(self.qformer_batch([ids for e in encoded for ids in e.qformer_ids]))
        return batch

    def qformer_batch(self, qformer_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Instructions of n images, right-padded: `qformer_input_ids` / `qformer_attention_mask` (n_img, T).

        Right padding, whatever the tokenizer's side: positions count from the first token, so padding must
        not shift them (the padded slots are masked out of attention).
        """
        longest = max((len(ids) for ids in qformer_ids), default=0)
        input_ids = torch.full((len(qformer_ids), longest), self.qformer_tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(qformer_ids), longest), dtype=torch.long)
        for row, ids in enumerate(qformer_ids):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        return {"qformer_input_ids": input_ids, "qformer_attention_mask": mask}  # (n_img, T) each

    def __call__(self, conversations: list[list[dict]], add_generation_prompt: bool = False) -> dict:
        return self.collate([self.encode(c, add_generation_prompt=add_generation_prompt) for c in conversations])

    # ---- text out -----------------------------------------------------------------------------
    def _stop_token_ids(self) -> list[int]:
        """EOS plus the first token the template writes after a reply (e.g. <|im_end|>)."""
        stops = set()
        if self.tokenizer.eos_token_id is not None:
            stops.add(self.tokenizer.eos_token_id)
        end_ids = self.tokenizer(end_of_turn_text(self.tokenizer, self.template), add_special_tokens=False)["input_ids"]
        if end_ids and end_ids[0] in self.tokenizer.all_special_ids:
            stops.add(end_ids[0])
        return sorted(stops)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([i for i in ids if i != self.image_token_id], skip_special_tokens=True)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory)
        if self.qformer_tokenizer is not None:
            self.qformer_tokenizer.save_pretrained(directory / QFORMER_TOKENIZER_DIR)
        (directory / TEMPLATE_FILE).write_text(self.template)
        settings = {
            "image_size": self.image_processor.image_size,
            "image_mean": list(self.image_processor.image_mean),
            "image_std": list(self.image_processor.image_std),
            "resize_mode": self.image_processor.resize_mode,
        }
        (directory / IMAGE_PROCESSOR_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def _marked_contents(marked: str, text: str) -> list[tuple[int, int]] | None:
    """Per marked reply, its (start, end) in `text`; None unless the markers alternate open, close and
    `marked` without them is `text` (markers that changed the rendering, or were dropped, say nothing)."""
    markers = [(match.start(), match.group()) for match in MARKER.finditer(marked)]
    if "".join(kind for _, kind in markers) != (SPAN_OPEN + SPAN_CLOSE) * (len(markers) // 2):
        return None
    if MARKER.sub("", marked) != text:
        return None
    positions = [at - n for n, (at, _) in enumerate(markers)]  # in `text`: the n markers before are gone
    return list(zip(positions[::2], positions[1::2]))


def _starts_inside(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token (its character offsets), whether it starts inside one of the sorted `spans`."""
    inside, span_i = [], 0
    for start, _end in offsets:
        while span_i < len(spans) and start >= spans[span_i][1]:
            span_i += 1
        inside.append(span_i < len(spans) and spans[span_i][0] <= start)
    return inside


def _checked_text(text, where: str) -> str:
    """`text` if the tokenizer can take it: a string of valid Unicode (no lone surrogates)."""
    if not isinstance(text, str):
        raise MessageError(f"{where}: text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MessageError(
            f"{where}: the text is not valid Unicode (a lone surrogate {text[e.start]!r} at character {e.start}); "
            "send UTF-8 text"
        ) from None
    return text


def tokenizer_limit(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The tokenizer's own `model_max_length`, or None where it is transformers' "unset" sentinel (1e30)."""
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if limit is not None and limit <= 1_000_000 else None


def read_text_parts(directory: str | Path, config: MLLMConfig) -> tuple[PreTrainedTokenizerBase, str, object]:
    """(tokenizer, chat template, Q-Former tokenizer or None) of an mllm checkpoint directory."""
    directory = Path(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    template = (directory / TEMPLATE_FILE).read_text()
    folder = directory / QFORMER_TOKENIZER_DIR
    if not config.connector.qformer_text_input:
        if folder.is_dir():
            # Converted by an mllm whose config could not say the Q-Former reads text.
            raise CheckpointError(
                f"{directory} has {QFORMER_TOKENIZER_DIR}/ but its connector config lacks qformer_text_input; it "
                "was converted by an older mllm: convert the InstructBLIP checkpoint again with `mllm convert`"
            )
        return tokenizer, template, None
    if not folder.is_dir():
        raise CheckpointError(
            f"{directory}: connector.qformer_text_input is set but {QFORMER_TOKENIZER_DIR}/ (the Q-Former's "
            "instruction tokenizer) is missing; re-save the model with save_pretrained"
        )
    return tokenizer, template, AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
