"""`mllm eval`: answer a LLaVA-format question set greedily and score it.

Scores: normalized exact match (VQAv2-style answer normalization), yes/no accuracy with
precision / recall / F1 and the yes-ratio (POPE-style, "yes" is the positive class), count
accuracy (numeric references), and a breakdown per question type (a row's `type` field, else
`other`). Each row's last answer is the reference; earlier turns are the context.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mllm.commandline import Parser, UsageError, add_model_args, quantization, run
from mllm.errors import MLLMError
from mllm.generation import GenerationConfig, generate
from training.data import DataError, read_rows

_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$:']")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def normalize_answer(text: str) -> str:
    """VQAv2-style: lowercase, strip punctuation (not decimal points), number words -> digits, drop articles."""
    text = text.strip().lower().replace("\n", " ").replace("\t", " ")
    text = _PERIOD.sub("", _PUNCT.sub(" ", text))
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def _is_number(text: str) -> bool:
    return text.isdigit()


@dataclass
class Scores:
    """Running tallies; `summary()` turns them into the reported metrics."""

    per_type: dict[str, list[int]] = field(default_factory=dict)  # type -> [correct, total]
    yes_no: dict[str, int] = field(default_factory=lambda: {"tp": 0, "fp": 0, "tn": 0, "fn": 0, "said_yes": 0})
    count: list[int] = field(default_factory=lambda: [0, 0])

    def add(self, qtype: str, prediction: str, reference: str) -> bool:
        pred, ref = normalize_answer(prediction), normalize_answer(reference)
        correct = pred == ref
        tally = self.per_type.setdefault(qtype, [0, 0])
        tally[0] += correct
        tally[1] += 1
        if ref in ("yes", "no"):
            # POPE reads the first word; anything but "yes" is a "no" (a rambling answer is never a hit).
            said_yes = pred.split()[:1] == ["yes"]
            self.yes_no["said_yes"] += said_yes
            self.yes_no[("t" if said_yes == (ref == "yes") else "f") + ("p" if said_yes else "n")] += 1
        if _is_number(ref):
            self.count[0] += correct
            self.count[1] += 1
        return correct

    def summary(self) -> dict:
        total = sum(t for _, t in self.per_type.values())
        correct = sum(c for c, _ in self.per_type.values())
        out = {
            "questions": total,
            "accuracy": correct / total if total else 0.0,
            "per_type": {k: {"accuracy": c / t, "n": t} for k, (c, t) in sorted(self.per_type.items())},
        }
        yn = self.yes_no
        n_yn = yn["tp"] + yn["fp"] + yn["tn"] + yn["fn"]
        if n_yn:
            precision = yn["tp"] / (yn["tp"] + yn["fp"]) if yn["tp"] + yn["fp"] else 0.0
            recall = yn["tp"] / (yn["tp"] + yn["fn"]) if yn["tp"] + yn["fn"] else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            out["yes_no"] = {
                "n": n_yn,
                "accuracy": (yn["tp"] + yn["tn"]) / n_yn,
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "yes_ratio": yn["said_yes"] / n_yn,
            }
        if self.count[1]:
            out["count"] = {"accuracy": self.count[0] / self.count[1], "n": self.count[1]}
        return out


def markdown_table(summary: dict, title: str = "model") -> str:
    lines = ["| question type | n | accuracy |", "|---|---|---|"]
    for qtype, m in summary["per_type"].items():
        lines.append(f"| {qtype} | {m['n']} | {m['accuracy']:.1%} |")
    lines.append(f"| **overall** | {summary['questions']} | **{summary['accuracy']:.1%}** |")
    if "yes_no" in summary:
        yn = summary["yes_no"]
        lines.append("")
        lines.append(
            f"yes/no ({yn['n']}): accuracy {yn['accuracy']:.1%}, precision {yn['precision']:.1%}, "
            f"recall {yn['recall']:.1%}, F1 {yn['f1']:.1%}, yes-ratio {yn['yes_ratio']:.1%}"
        )
    if "count" in summary:
        lines.append(f"count ({summary['count']['n']}): accuracy {summary['count']['accuracy']:.1%}")
    return f"**{title}**\n\n" + "\n".join(lines) + "\n"


def evaluate(model, rows, max_new_tokens: int = 48, limit: int | None = None, progress: bool = True):
    """Greedy answers for each row's last turn; returns (summary, predictions)."""
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    scores, predictions = Scores(), []
    rows = rows[:limit] if limit else rows
    for row in tqdm(rows, desc="eval", unit="q", disable=not progress, file=sys.stderr):
        context, reference = row.messages[:-1], row.messages[-1]["content"]
        try:
            answer = generate(model, context, row.images, gen=gen)
        except MLLMError as e:  # an over-long or malformed row: say which, before any later row runs
            raise type(e)(f"{row.id}: {e}") from e
        qtype = row.raw.get("type", "other")
        correct = scores.add(qtype, answer, reference)
        predictions.append({"id": row.id, "type": qtype, "prediction": answer, "reference": reference, "ok": correct})
    return scores.summary(), predictions


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv, prog="mllm eval")


def _main(argv: list[str]) -> int:
    p = Parser(prog="mllm eval", description="Score a model on a LLaVA-format question set.")
    add_model_args(p)
    p.add_argument("--data", required=True, help="LLaVA JSON / JSONL; each row's last gpt turn is the reference")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--output", default=None, help="write OUTPUT.json (metrics + predictions) and OUTPUT.md")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args(argv)
    try:
        rows = read_rows(args.data, args.image_folder)
    except DataError as e:
        raise UsageError(f"mllm eval: {e}") from e
    from mllm.loading import load_model

    try:
        model = load_model(args.model, device=args.device, quantization=quantization(args))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UsageError(f"mllm eval: cannot load model {args.model!r}: {e}") from e
    summary, predictions = evaluate(model, rows, args.max_new_tokens, args.limit)
    table = markdown_table(summary, title=f"{args.model} on {Path(args.data).name}")
    print(table)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"summary": summary, "predictions": predictions}, indent=2))
        out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
