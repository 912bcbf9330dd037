"""The dataset formats people have, read as LLaVA records: one registry entry per format.

- `llava`:    `{"id", "image": str | [str], "conversations": [{"from": "human"|"gpt"|"system", "value"}]}`
- `sharegpt`: LLaMA-Factory's rows, `{"messages": [{"role": "user"|"assistant"|"system", "content": str}],
              "images": [str]}`, with `<image>` placeholders in the contents
- `openai`:   OpenAI chat `messages` whose contents are strings or parts (`{"type": "text", "text"}`,
              `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..." | "path/to.png"}}`)
- `hf`:       a Hugging Face `datasets` folder (`save_to_disk`) or Parquet file(s) whose rows are any of the
              above, with images as `datasets.Image` columns (bytes) or as path strings

Every reader yields (where, LLaVA record | DataError) per row, so `training.data.parse_row` and the validator
check rows of any format the same way and name each bad one. Image bytes (data: URLs, `datasets.Image`
cells) are written once, content-addressed, under `IMAGE_ROOT/.decoded/` (the image folder, or else the
data's own folder): training reads images as files, so the feature cache can key them by content.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mllm.commandline import Parser, UsageError, run
from training.data import ROLE_OF, DataError, Row, parse_row, read_records

PLACEHOLDER = "<image>"
DECODED = ".decoded"
# LLaVA's role names for each message role (the reverse of training.data.ROLE_OF).
FROM_OF = {"user": "human", "assistant": "gpt", "system": "system"}
HF_SUFFIXES = (".parquet",)


@dataclass
class Records:
    """A data source read as LLaVA records."""

    format: str
    """The format the rows were in (detected or given)."""
    items: list[tuple[str, dict | Exception]]
    """(where: `id` / `line N` / `row N`, the LLaVA record or why the row could not be read)."""
    image_folder: Path | None
    """Where the records' image paths resolve (None: LLaVA data given no --image-folder)."""


class _Images:
    """Writes image bytes once under ROOT/.decoded/<sha256[:2]>/<sha256>.<ext>; returns the path under ROOT."""

    def __init__(self, root: Path):
        self.root = root

    def save(self, data: bytes, suffix: str) -> str:
        digest = hashlib.sha256(data).hexdigest()
        relative = Path(DECODED) / digest[:2] / f"{digest}{suffix}"
        path = self.root / relative
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".tmp-{digest}{suffix}")
            tmp.write_bytes(data)
            tmp.replace(path)  # a reader never sees half a file
        return relative.as_posix()


# ---- each format -> LLaVA --------------------------------------------------------------------------
def _llava(record: dict, images: _Images) -> dict:
    return record


def _sharegpt(record: dict, images: _Images) -> dict:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list of {'role', 'content'}")
    turns = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"message {k} must be {{'role': ..., 'content': str}}")
        if message.get("role") not in FROM_OF:
            raise DataError(f"message {k} has role={message.get('role')!r}; use user, assistant or system")
        turns.append({"from": FROM_OF[message["role"]], "value": message["content"]})
    found = record.get("images", [])
    found = [found] if isinstance(found, (str, dict)) else found
    if not isinstance(found, list):
        raise DataError("'images' must be a list of image paths")
    return _llava_record(record, turns, [_image_ref(i, images, "'images'") for i in found])


def _openai(record: dict, images: _Images) -> dict:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list of {'role', 'content'}")
    turns, found = [], []
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in FROM_OF:
            role = message.get("role") if isinstance(message, dict) else None
            raise DataError(f"message {k} has role={role!r}; use user, assistant or system")
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise DataError(f"message {k}: 'content' must be a string or a list of parts")
        text = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                text.append(part["text"])
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise DataError(f"message {k} part {j}: 'image_url' must be {{'url': str}}")
                found.append(_image_ref(url, images, f"message {k} part {j}"))
                text.append(PLACEHOLDER)  # the image's place in the text, as LLaVA rows mark it
            else:
                raise DataError(f"message {k} part {j}: expected a text or image_url part, got {part!r:.80}")
        turns.append({"from": FROM_OF[message["role"]], "value": "\n".join(text)})
    return _llava_record(record, turns, found)


def _llava_record(record: dict, turns: list[dict], image_refs: list[str]) -> dict:
    out = {k: v for k, v in record.items() if k not in ("messages", "images")}  # keeps id, type, qa, ...
    out["conversations"] = turns
    if image_refs:
        out["image"] = image_refs
    return out


def _image_ref(image, images: _Images, where: str) -> str:
    """A row's image as a path under the image root: a path as is, a data: URL or image bytes decoded."""
    if isinstance(image, dict):  # a datasets.Image cell read undecoded: {"bytes", "path"}
        if image.get("bytes"):
            return images.save(image["bytes"], Path(image.get("path") or "x.png").suffix or ".png")
        image = image.get("path")
    if not isinstance(image, str) or not image:
        raise DataError(f"{where}: an image must be a path, a data: URL or image bytes, got {image!r:.80}")
    if image.startswith("data:"):
        header, _, payload = image.partition(",")
        if not header.endswith(";base64") or not header.startswith("data:image/"):
            raise DataError(f"{where}: a data: URL must be data:image/<type>;base64,<bytes>")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise DataError(f"{where}: the data: URL's base64 does not decode ({e})") from e
        return images.save(data, "." + header[len("data:image/") : -len(";base64")].replace("jpeg", "jpg"))
    if image.startswith(("http://", "https://")):
        raise DataError(f"{where}: image {image!r:.80} is a web URL; download it and give its path")
    return image.removeprefix("file://")


@dataclass(frozen=True)
class Format:
    to_llava: Callable[[dict, _Images], dict]
    """A record of this format -> a LLaVA record (DataError naming what is wrong)."""
    from_llava: Callable[[dict, Path | None, bool], dict]
    """A LLaVA record -> this format (`mllm data convert`); (record, image folder, embed images)."""


def _to_sharegpt(record: dict, folder: Path | None, embed: bool) -> dict:
    out = {k: v for k, v in record.items() if k not in ("conversations", "image")}
    out["messages"] = [{"role": ROLE_OF[t["from"]], "content": t["value"]} for t in record["conversations"]]
    out["images"] = [_image_out(i, folder, embed) for i in _image_list(record)]
    return out


def _to_openai(record: dict, folder: Path | None, embed: bool) -> dict:
    pending = [_image_out(i, folder, embed) for i in _image_list(record)]
    messages = []
    for turn in record["conversations"]:
        pieces, parts = turn["value"].split(PLACEHOLDER), []
        for n, piece in enumerate(pieces):
            if n:
                parts.append({"type": "image_url", "image_url": {"url": pending.pop(0)}})
            if piece.strip():
                parts.append({"type": "text", "text": piece.strip("\n")})
        role = ROLE_OF[turn["from"]]
        # Text-only turns as plain strings, as OpenAI's own examples write them.
        only_text = len(parts) == 1 and parts[0]["type"] == "text"
        messages.append({"role": role, "content": parts[0]["text"] if only_text else parts})
    out = {k: v for k, v in record.items() if k not in ("conversations", "image")}
    out["messages"] = messages
    return out


def _to_llava(record: dict, folder: Path | None, embed: bool) -> dict:
    if not embed:
        return record
    return {**record, "image": [_image_out(i, folder, True) for i in _image_list(record)]}


def _image_list(record: dict) -> list[str]:
    images = record.get("image", [])
    return [images] if isinstance(images, str) else list(images)


def _image_out(image: str, folder: Path | None, embed: bool) -> str:
    if not embed:
        return image
    path = Path(folder or ".") / image
    kind = path.suffix.lstrip(".").lower().replace("jpg", "jpeg") or "png"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


FORMATS: dict[str, Format] = {
    "llava": Format(_llava, _to_llava),
    "sharegpt": Format(_sharegpt, _to_sharegpt),
    "openai": Format(_openai, _to_openai),
}
READERS = (*FORMATS, "hf")  # `hf` holds rows of one of the others: it is a container, not a row format


def detect(records: list[dict]) -> str:
    """The row format of `records` (dicts only): `conversations` -> llava; `messages` with a list content
    (parts) anywhere -> openai, else sharegpt. Rows of two kinds are an error: say which with --format."""
    kinds = set()
    for record in records:
        if "conversations" in record:
            kinds.add("llava")
        elif isinstance(record.get("messages"), list):
            parts = any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in record["messages"])
            kinds.add("openai" if parts else "messages")
    if "openai" in kinds:
        kinds.discard("messages")
    kinds = {"sharegpt" if k == "messages" else k for k in kinds}
    if len(kinds) > 1:
        raise DataError(f"the rows mix formats ({', '.join(sorted(kinds))}); give --format or split the file")
    return kinds.pop() if kinds else "llava"


def is_hf(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() or path.suffix in HF_SUFFIXES


def load_records(path: str | Path, image_folder: str | Path | None = None, format: str | None = None) -> Records:
    """Every row of `path` (a JSON / JSONL file, a `datasets` folder or a Parquet file) as a LLaVA record.

    Images of formats other than LLaVA resolve under `image_folder`, or else the data's own folder.
    """
    if format is not None and format not in READERS:
        raise DataError(f"unknown data format {format!r}; use one of {', '.join(READERS)}")
    path = Path(path)
    if format == "hf" or (format is None and is_hf(path)):
        raw = _hf_records(path)
        format = None
    else:
        if not path.exists():
            raise FileNotFoundError(f"data file {path} does not exist")
        raw = read_records(path)
    row_format = format or detect([r for _, r in raw if isinstance(r, dict)])
    folder = image_folder
    if folder is None and (row_format != "llava" or is_hf(path)):
        folder = path if path.is_dir() else path.parent
    convert, images = FORMATS[row_format].to_llava, _Images(Path(folder) if folder is not None else path.parent)
    items = []
    for where, record in raw:
        if isinstance(record, dict):
            name = str(record["id"]) if "id" in record else where
            try:
                record = convert(record, images)
            except DataError as e:
                record = DataError(f"{name}: {e}")
        items.append((where, record))
    return Records(row_format, items, Path(folder) if folder is not None else None)


def read_rows(path: str | Path, image_folder: str | Path | None, format: str | None = None) -> list[Row]:
    """Every row of `path` in any format, or a DataError listing the first bad ones (`mllm data validate`
    lists all)."""
    records = load_records(path, image_folder, format)
    rows, errors = [], []
    for where, record in records.items:
        try:
            if isinstance(record, Exception):
                raise record
            rows.append(parse_row(where, record, records.image_folder))
        except DataError as e:
            errors.append(str(e))
    if errors:
        shown = "\n  ".join(errors[:5])
        raise DataError(f"{path}: {len(errors)} bad row(s); run `mllm data validate` for all of them:\n  {shown}")
    return rows


def _hf_records(path: Path) -> list[tuple[str, dict]]:
    """A `datasets` folder (`save_to_disk`) or Parquet file(s) as plain dict rows, images undecoded."""
    try:
        import datasets
    except ImportError as e:  # a base dependency; a trimmed install may lack it
        raise DataError(f"{path}: reading Hugging Face datasets needs `pip install datasets`") from e
    datasets.disable_progress_bars()  # a validate / convert prints its own lines only
    if path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json")):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            raise DataError(f"{path}: holds splits {list(dataset)}; give one split's folder, e.g. {path}/train")
    else:
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise DataError(f"{path}: neither a `save_to_disk` folder nor a folder of .parquet files")
        dataset = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    # Images as {"bytes", "path"}: decoding to PIL and encoding again would change the bytes (and the cache key).
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, datasets.List | datasets.Sequence) and isinstance(feature.feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return [(f"row {i}", _json_safe(row)) for i, row in enumerate(dataset)]


def _json_safe(row: dict) -> dict:
    """Parquet fills absent struct fields with None (an OpenAI text part gains `image_url: None`): drop them."""
    if isinstance(row, dict):
        return {k: _json_safe(v) for k, v in row.items() if v is not None}
    if isinstance(row, list):
        return [_json_safe(v) for v in row]
    return row


def convert(source, target, to: str, image_folder=None, format=None, embed=False) -> tuple[int, Path | None]:
    """`mllm data convert`: every row of `source` written to `target` in format `to` (a .json list, else JSONL).
    Any bad row stops it, named (run `mllm data validate` first). Returns (rows written, the folder the
    written image paths resolve under: the source's, where decoded images went too)."""
    if to not in FORMATS:
        raise DataError(f"--to {to!r}; use one of {', '.join(FORMATS)}")
    records = load_records(source, image_folder, format)
    bad = []
    for where, record in records.items:  # what training would refuse is not written in another format either
        try:
            if isinstance(record, Exception):
                raise record
            row = parse_row(where, record, records.image_folder)
            placeholders = sum(m["content"].count(PLACEHOLDER) for m in row.messages)
            if placeholders != len(row.images):
                raise DataError(f"{row.id}: {placeholders} {PLACEHOLDER} placeholder(s) but {len(row.images)} image(s)")
        except DataError as e:
            bad.append(str(e))
    if bad:
        raise DataError(
            f"{source}: {len(bad)} bad row(s); run `mllm data validate` for all:\n  " + "\n  ".join(bad[:5])
        )
    rows = [FORMATS[to].from_llava(r, records.image_folder, embed) for _, r in records.items]
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix == ".json":
        target.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        target.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows), records.image_folder


# ---- command line -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`mllm data convert IN OUT --to llava|sharegpt|openai`."""
    return run(_main, argv, prog="mllm data convert")


def _main(argv: list[str]) -> int:
    p = Parser(prog="mllm data convert", description="Write a dataset's rows in another format.")
    p.add_argument("source", help="a .json / .jsonl file, a `datasets` folder or .parquet file(s)")
    p.add_argument("target", help="where to write: a .json list, or JSONL for any other name")
    p.add_argument("--to", required=True, choices=FORMATS, help="the format to write")
    p.add_argument("--format", choices=READERS, default=None, help="the source's format (default: detected)")
    p.add_argument("--image-folder", default=None, help="where the source's image paths resolve")
    p.add_argument("--embed-images", action="store_true", help="write images as data: URLs instead of paths")
    args = p.parse_args(argv)
    try:
        n, folder = convert(args.source, args.target, args.to, args.image_folder, args.format, args.embed_images)
    except (DataError, FileNotFoundError) as e:
        raise UsageError(f"mllm data convert: {e}") from e
    note = "" if args.embed_images or folder is None else f"; its image paths resolve under {folder}"
    print(f"wrote {n} {args.to} rows to {args.target}{note}")
    return 0
