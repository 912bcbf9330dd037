"""LLaVA-format data: JSON (a list) or JSONL (a row a line) -> rows of messages + image paths.

A row is `{"id", "image": str | [str] (optional), "conversations": [{"from": "human"|"gpt"|"system",
"value": str}, ...]}` with `<image>` placeholders in the values. Image paths resolve under the
image folder only; a path escaping it is a bad row (a dataset can't make us read /etc/passwd).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mllm.processor import Encoded, Processor

ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A bad row; the message starts with the row's id (or line number) and says what is wrong."""


@dataclass
class Row:
    id: str
    """The row's `id`, or `line N` / `row N` when it has none."""
    messages: list[dict]
    """Messages with string content (`<image>` placeholders kept)."""
    images: list[Path]
    """Resolved image files, in placeholder order."""
    raw: dict
    """The row as read (extra fields such as `type` / `qa` are kept for evaluation)."""
    views: list | None = None
    """Per image, the classifier view the row gives (`classifier_view`: `mllm.classifier_view`), or None."""


def read_records(path: str | Path) -> list[tuple[str, dict | Exception]]:
    """(where, record or the parse error) for every row; JSONL errors carry their line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                out.append((f"line {n}", DataError(f"line {n}: invalid JSON ({e.msg} at column {e.colno})")))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows (or use .jsonl for one row per line)")
    return [(f"row {i}", record) for i, record in enumerate(data)]


def parse_row(where: str, record: dict, image_folder: str | Path | None) -> Row:
    """Schema and file checks for one record; raises DataError naming the row."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(record).__name__}")
    rid = str(record.get("id", where))
    name = rid if "id" in record else where
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{name}: 'conversations' must be a non-empty list")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{name}: turn {k} must be {{'from': ..., 'value': str}}")
        role = ROLE_OF.get(turn.get("from"))
        if role is None:
            raise DataError(f"{name}: turn {k} has from={turn.get('from')!r}; use human, gpt or system")
        messages.append({"role": role, "content": turn["value"]})
    _check_turn_order(name, messages)
    images = record.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise DataError(f"{name}: 'image' must be a file name or a list of file names")
    views = None
    if "classifier_view" in record:
        if len(images) != 1:
            raise DataError(f"{name}: 'classifier_view' describes one image, but the row has {len(images)}")
        try:
            views = [_check_view(record["classifier_view"])]
        except ValueError as e:
            raise DataError(f"{name}: {e}") from e
    return Row(rid, messages, [_resolve(name, i, image_folder) for i in images], record, views)


def _check_view(view) -> list[tuple[str, float]]:
    """A row's `classifier_view`: [[ImageNet class name, probability], ...], most likely first."""
    from mllm.classifier_view import imagenet_labels

    known = set(imagenet_labels())
    if not isinstance(view, list) or not view:
        raise ValueError("'classifier_view' must be a non-empty list of [class name, probability] pairs")
    out = []
    for pair in view:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], (int, float))):
            raise ValueError(f"'classifier_view' entry {pair!r} is not a [class name, probability] pair")
        if pair[0] not in known:
            raise ValueError(f"'classifier_view' names {pair[0]!r}, which is not one of the 1000 ImageNet classes")
        if not 0 <= pair[1] <= 1:
            raise ValueError(f"'classifier_view' gives {pair[0]!r} probability {pair[1]}; use a value in [0, 1]")
        out.append((pair[0], float(pair[1])))
    return out


def _check_turn_order(name: str, messages: list[dict]) -> None:
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body:
        raise DataError(f"{name}: no human/gpt turns")
    for k, message in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise DataError(f"{name}: turns must alternate human, gpt, human, ...; turn {k} is {message['role']}")
    if body[-1]["role"] != "assistant":
        raise DataError(f"{name}: the last turn is from human; a training row must end with a gpt answer")
    for message in body:
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(f"{name}: an answer (gpt turn) is empty")


def _resolve(name: str, image: str, folder: str | Path | None) -> Path:
    if folder is None:
        raise DataError(f"{name}: has image {image!r} but no --image-folder was given")
    root = Path(folder).resolve()
    path = (root / image).resolve()
    if not path.is_relative_to(root):
        raise DataError(f"{name}: image path {image!r} escapes the image folder {root}")
    if not path.is_file():
        raise DataError(f"{name}: image file {image!r} not found under {root}")
    return path


class ConversationDataset(torch.utils.data.Dataset):
    """Rows -> Encoded samples (truncated to the processor's max_length, images kept as paths).

    A sample whose supervised tokens are all cut away is an error naming the row, never a silent
    zero loss.
    """

    def __init__(self, rows: list[Row], processor: Processor):
        self.rows = rows
        self.processor = processor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Encoded:
        row = self.rows[index]
        try:
            encoded = self.processor.encode(row.messages, row.images, truncate=True)
        except ValueError as e:
            raise DataError(f"{row.id}: {e}") from e
        if encoded.num_supervised == 0:
            raise DataError(
                f"{row.id}: no answer tokens left after truncation to {self.processor.max_length} tokens; "
                "raise max_length or shorten the row"
            )
        return encoded
