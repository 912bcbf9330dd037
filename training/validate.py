"""`mllm data validate`: check every row of a dataset (LLaVA, ShareGPT, OpenAI or `datasets`; `training.formats`)
and name each bad one.

`training.data` stops a row at its first problem (training only needs yes / no); here every row is
walked and each of its problems becomes one line `<id | line N | row N>: <reason>`, so a dataset
can be fixed in one pass. With a processor the rows are also rendered through the chat template
and truncated to `max_length`: a row whose answer tokens are all cut away would train on nothing.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mllm.commandline import Parser, UsageError, run
from mllm.image_processing import ImageError, load_image
from mllm.loading import load_processor
from mllm.processor import Processor
from training.data import ROLE_OF, DataError, _resolve, parse_row
from training.formats import READERS, load_records
from training.mixture import parse_source

PLACEHOLDER = "<image>"  # LLaVA data's placeholder, whatever token the model expands it to
EXIT_OK, EXIT_BAD = 0, 1  # usage errors: mllm.commandline's EXIT_USAGE (2)

# training.data's messages -> the short kind the summary counts. Checks written here name their kind.
_KINDS = (
    ("invalid JSON", "invalid JSON"),
    ("must be a JSON object", "not an object"),
    ("'conversations'", "no conversations"),
    ("must be {'from'", "malformed turn"),
    ("has from=", "wrong role"),
    ("no human/gpt turns", "turn order"),
    ("must alternate", "turn order"),
    ("last turn is from human", "ends with human turn"),
    ("(gpt turn) is empty", "empty answer"),
    ("'image' must be", "bad image field"),
    ("escapes the image folder", "image outside folder"),
    ("not found under", "missing image"),
    ("no --image-folder", "no image folder"),
)


def _kind(reason: str) -> str:
    return next((kind for needle, kind in _KINDS if needle in reason), "bad row")


@dataclass
class Report:
    rows_total: int = 0
    rows_bad: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)
    """(where, reason), one per problem, in file order; a row may have several."""
    kinds: Counter = field(default_factory=Counter)
    """Problem counts by short kind ("missing image", "empty answer", ...)."""
    lengths: list[int] = field(default_factory=list)
    """Token length of each encoded row before truncation (image tokens included)."""
    shares: list[float] = field(default_factory=list)
    """Supervised tokens / tokens of each encoded row after truncation."""
    truncated: int = 0
    max_length: int | None = None
    format: str = "llava"
    """The rows' format (`training.formats`), as detected or given."""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def mean_length(self) -> float:
        return statistics.fmean(self.lengths) if self.lengths else 0.0

    @property
    def longest(self) -> int:
        return max(self.lengths, default=0)

    @property
    def mean_share(self) -> float:
        return statistics.fmean(self.shares) if self.shares else 0.0

    def summary(self) -> str:
        kind = "" if self.format == "llava" else f"{self.format} "  # LLaVA is the default: said only otherwise
        text = f"checked {self.rows_total} {kind}rows: "
        if self.rows_bad:
            counts = ", ".join(f"{n} {kind}" for kind, n in self.kinds.most_common())
            text += f"{self.rows_bad} bad ({counts})"
        else:
            text += "all good"
        if self.lengths:
            text += f"; mean {self.mean_length:.0f} tokens, max {self.longest}"
            if self.max_length is not None:
                text += f", {self.truncated} truncated to {self.max_length}"
            shares = sorted(self.shares)
            p10 = shares[int(0.1 * (len(shares) - 1))]
            text += (
                f", supervised share {self.mean_share:.2f}"
                f" (min {shares[0]:.2f}, p10 {p10:.2f}, median {statistics.median(shares):.2f}, max {shares[-1]:.2f})"
            )
        return text


def validate(
    path: str | Path,
    image_folder: str | Path | None,
    processor: Processor | None = None,
    max_length: int | None = None,
    min_supervised_share: float = 0.0,
    format: str | None = None,
) -> Report:
    """Check every row of `path` (any `training.formats` format: `format`, or detected from the rows); token
    checks need a `processor` (`max_length` overrides its own limit).

    Raises FileNotFoundError for a missing file and DataError when a .json file is not a JSON list.
    """
    if max_length is not None and max_length <= 0:
        raise ValueError(f"max_length={max_length} must be a positive number of tokens")
    if not 0.0 <= min_supervised_share < 1.0:
        raise ValueError(f"min_supervised_share={min_supervised_share} must be in [0, 1)")
    full = cut = None
    if processor is not None:
        # Copies, so the caller's processor keeps its limit: `full` measures, `cut` truncates as training does.
        full, cut = copy.copy(processor), copy.copy(processor)
        full.max_length = None
        cut.max_length = max_length if max_length is not None else processor.max_length
    report = Report(max_length=cut.max_length if cut is not None else None)
    records = load_records(path, image_folder, format)
    report.format = records.format
    checker = _RowChecker(records.image_folder, full, cut, min_supervised_share, report)
    for where, record in records.items:
        report.rows_total += 1
        problems = checker.check(where, record)
        if problems:
            report.rows_bad += 1
        for name, reason, kind in problems:
            report.problems.append((name, reason))
            report.kinds[kind] += 1
    return report


class _RowChecker:
    def __init__(self, image_folder, full: Processor | None, cut: Processor | None, min_share: float, report: Report):
        self.image_folder = image_folder
        self.full, self.cut = full, cut
        self.min_share = min_share
        self.report = report
        self._image_errors: dict[Path, str | None] = {}  # datasets reuse images: open each file once

    def check(self, where: str, record) -> list[tuple[str, str, str]]:
        """(name, reason, kind) for every problem of one record."""
        if isinstance(record, Exception):  # unparsable JSON, or a row its format's reader could not read
            reason = str(record)
            name = reason.split(": ", 1)[0] if ": " in reason else where
            kind = "invalid JSON" if "invalid JSON" in reason else f"bad {self.report.format} row"
            return [(name, _strip(name, reason), kind)]
        if not isinstance(record, dict):
            return [(where, f"a row must be a JSON object, got {type(record).__name__}", "not an object")]
        name = str(record["id"]) if "id" in record else where
        problems: list[tuple[str, str]] = []

        # Conversation checks alone (images removed), so image problems are reported beside them.
        messages = None
        try:
            messages = parse_row(where, {**record, "image": []}, None).messages
        except DataError as e:
            problems.append((_strip(name, str(e)), None))
            if _kind(str(e)) != "empty answer" and _has_empty_answer(record.get("conversations")):
                problems.append(("an answer (gpt turn) is empty", "empty answer"))

        images = record.get("image", [])
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            problems.append(("'image' must be a file name or a list of file names", "bad image field"))
        else:
            problems += self._image_problems(name, images)
            turns = record.get("conversations")
            placeholders = _count_placeholders(turns)
            # Without a conversation there is nothing to count placeholders in (already reported above).
            if isinstance(turns, list) and turns and placeholders != len(images):
                problems.append(
                    (f"{placeholders} {PLACEHOLDER} placeholder(s) but {len(images)} image(s)", "placeholder count")
                )
            elif messages is not None and self.full is not None:
                problems += self._token_problems(messages, images)
        return [(name, reason, kind or _kind(reason)) for reason, kind in problems]

    def _image_problems(self, name: str, images: list[str]) -> list[tuple[str, str | None]]:
        problems = []
        for image in images:
            try:
                path = _resolve(name, image, self.image_folder)
            except DataError as e:
                problems.append((_strip(name, str(e)), None))
                continue
            if path not in self._image_errors:
                try:
                    load_image(path, name=image)
                    self._image_errors[path] = None
                except ImageError as e:
                    self._image_errors[path] = f"unreadable image {e}"
            if self._image_errors[path] is not None:
                problems.append((self._image_errors[path], "unreadable image"))
        return problems

    def _token_problems(self, messages: list[dict], images: list[str]) -> list[tuple[str, str]]:
        # Image files are not opened here: encode keeps them as sources, so this works even when some are missing.
        try:
            encoded = self.full.encode(messages, images)
        except ValueError as e:
            return [(f"template rendering failed: {e}", "template error")]
        length, limit = len(encoded.input_ids), self.cut.max_length
        if limit is not None and length > limit:
            self.report.truncated += 1
            encoded = self.cut.encode(messages, images, truncate=True)
        self.report.lengths.append(length)
        share = encoded.num_supervised / max(1, len(encoded.input_ids))
        self.report.shares.append(share)
        if encoded.num_supervised == 0:
            if limit is not None and length > limit:
                return [
                    (f"all answer tokens truncated (row is {length} tokens, max length {limit})", "answer truncated")
                ]
            return [("no supervised (answer) tokens after rendering the template", "no supervised tokens")]
        if share < self.min_share:
            return [(f"supervised share {share:.3f} is below the minimum {self.min_share}", "low supervised share")]
        return []


def _strip(name: str, message: str) -> str:
    """training.data's messages start with the row's name; the report prints it once, in front."""
    return message.removeprefix(f"{name}: ")


def _has_empty_answer(turns) -> bool:
    if not isinstance(turns, list):
        return False
    return any(
        isinstance(t, dict)
        and ROLE_OF.get(t.get("from")) == "assistant"
        and isinstance(t.get("value"), str)
        and not t["value"].strip()
        for t in turns
    )


def _count_placeholders(turns) -> int:
    if not isinstance(turns, list):
        return 0
    return sum(t["value"].count(PLACEHOLDER) for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str))


# ---- command line -------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="mllm data validate", description="Check a dataset (any format) and name every bad row.")
    p.add_argument(
        "data",
        nargs="+",
        help="a .json list of rows, a .jsonl file, a `datasets` folder or .parquet file(s); several: a mixture's "
        "datasets, each checked and reported on its own (a PATH:WEIGHT as --data takes it is read as PATH)",
    )
    p.add_argument("--format", choices=READERS, default=None, help="the rows' format (default: detected)")
    p.add_argument("--image-folder", default=None, help="folder the rows' image paths are relative to")
    p.add_argument(
        "--model",
        default=None,
        help="also check template rendering and supervised tokens with this model's processor: "
        "'default' or a checkpoint directory (default: schema and file checks only; with --max-length, 'default')",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="truncate to this many tokens (default: the model's context length); counts with --model's tokenizer",
    )
    p.add_argument(
        "--min-supervised-share",
        type=float,
        default=0.0,
        help="flag rows whose share of supervised tokens after truncation is below this (default 0: only none)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Print one line per problem, then a summary; exit 1 if any row is bad, 2 on usage errors."""
    return run(_main, argv, prog="mllm data validate")


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    sources = [parse_source(entry) for entry in args.data]
    for source in sources:
        if not Path(source.path).exists():
            raise UsageError(f"mllm data validate: data file {source.path} does not exist")
    if args.image_folder is not None and not Path(args.image_folder).is_dir():
        raise UsageError(f"mllm data validate: image folder {args.image_folder} does not exist")
    if args.max_length is not None and args.max_length <= 0:
        raise UsageError(f"mllm data validate: --max-length {args.max_length} must be a positive integer")
    if not 0.0 <= args.min_supervised_share < 1.0:
        raise UsageError("mllm data validate: --min-supervised-share must be in [0, 1)")
    # Token lengths need a tokenizer: --max-length alone counts with the default model's.
    name = args.model if args.model is not None else "default" if args.max_length is not None else None
    processor = _load_processor(name) if name is not None else None
    ok = True
    for source in sources:
        # Several datasets: each line starts with its file, so a problem is found in the right one.
        head = f"{source.path}: " if len(sources) > 1 else ""
        try:
            report = validate(
                source.path, args.image_folder, processor, args.max_length, args.min_supervised_share, args.format
            )
        except DataError as e:  # a .json file that is not a JSON list: nothing row by row to report
            print(str(e))
            ok = False
            continue
        for where, reason in report.problems:
            print(f"{head}{where}: {reason}")
        print(head + report.summary())
        ok = ok and report.ok
    return EXIT_OK if ok else EXIT_BAD


def _load_processor(name: str) -> Processor:
    try:
        return load_processor(name)  # tokenizer, template and image settings: no weights are read
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UsageError(f"mllm data validate: cannot load model {name!r}: {e}") from e


if __name__ == "__main__":
    sys.exit(main())
