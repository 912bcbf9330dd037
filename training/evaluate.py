"""`mllm eval`: answer a LLaVA-format question set greedily and score it.

Scores: exact match after the official VQAv2 answer normalisation (`training.scoring`), yes/no accuracy with
precision / recall / F1 and the yes-ratio (POPE-style, "yes" is the positive class), count
accuracy (numeric references), and a breakdown per question type (a row's `type` field, else
`other`). Each row's last answer is the reference; earlier turns are the context.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mllm.batching import Batcher
from mllm.commandline import Parser, UsageError, add_model_args, quantization, run
from mllm.errors import MLLMError
from mllm.generation import GenerationConfig, Reply, generate, image_features
from training.data import DataError
from training.formats import read_rows
from training.photo_eval import photo_correct
from training.scoring import mme_scores, normalize_answer, pope_scores, vqa_accuracy, vqa_scores

# The official VQAv2 scorers are this module's public names too (what `mllm eval` scores with).
__all__ = ["Scores", "evaluate", "markdown_table", "normalize_answer", "vqa_accuracy"]


IMAGE_PLACEHOLDER = "<image>"  # LLaVA's placeholder in a row's text


def _is_number(text: str) -> bool:
    return text.isdigit()


@dataclass
class Scores:
    """Running tallies; `summary()` turns them into the reported metrics."""

    per_type: dict[str, list[int]] = field(default_factory=dict)  # type -> [correct, total]
    yes_no: dict[str, int] = field(default_factory=lambda: {"tp": 0, "fp": 0, "tn": 0, "fn": 0, "said_yes": 0})
    count: list[int] = field(default_factory=lambda: [0, 0])

    def add(self, qtype: str, prediction: str, reference: str, row: dict | None = None) -> bool:
        pred, ref = normalize_answer(prediction), normalize_answer(reference)
        # A real-photo question is scored against its classifier-level truth (`training.photo_eval`).
        correct = photo_correct(prediction, row) if qtype == "photo" and row is not None else pred == ref
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


def _with_images(messages: list[dict], images: list) -> list[dict]:
    """A row's messages with its images in their places (image parts, or `<image>` in a text), as the engine's
    requests carry them: every image an image part holding it."""
    pending, out = list(images), []
    for message in messages:
        content = message["content"]
        if isinstance(content, str) and IMAGE_PLACEHOLDER in content:
            pieces = content.split(IMAGE_PLACEHOLDER)
            content = [{"type": "text", "text": pieces[0]}] if pieces[0].strip() else []
            for piece in pieces[1:]:
                content.append({"type": "image", "image": pending.pop(0)})
                if piece.strip():
                    content.append({"type": "text", "text": piece.lstrip("\n")})
        elif isinstance(content, list):
            content = [{"type": "image", "image": pending.pop(0)} if part.get("type") == "image" else part
                       for part in content]  # fmt: skip
        out.append({**message, "content": content})
    return out


def answer_all(model, items: list[tuple[str, list[dict], list]], gen: GenerationConfig, on_answer, batch_size: int = 1,
               engine=None, progress: bool = True) -> None:  # fmt: skip
    """Greedy answers to `items` ((question_id, context messages, images) each), `on_answer(qid, text)` as each
    comes. `batch_size` > 1 decodes that many at once in `engine` (a `mllm.batching.Batcher`: one forward per
    step for all of them, each answer the one it gets alone)."""
    bar = tqdm(total=len(items), desc="eval", unit="q", disable=not progress, file=sys.stderr)  # with an ETA
    if batch_size <= 1 or engine is None:
        for qid, context, images in items:
            try:
                answer = generate(model, context, images, gen=gen)
            except MLLMError as e:  # an over-long or malformed row: say which, before any later row runs
                raise type(e)(f"{qid}: {e}") from e
            on_answer(qid, answer)
            bar.update()
        bar.close()
        return
    from concurrent.futures import ThreadPoolExecutor

    def one(item):
        qid, context, images = item
        try:  # the model calls on the batcher's model thread, the decode in its batch
            encoded = engine.run(model.processor.encode, context, images, add_generation_prompt=True)
            features = engine.run(image_features, model, encoded)
            return qid, "".join(Reply(model, encoded.input_ids, gen, features=features, batcher=engine))
        except MLLMError as e:
            raise type(e)(f"{qid}: {e}") from e

    with ThreadPoolExecutor(batch_size) as pool:
        for qid, answer in pool.map(one, items):
            on_answer(qid, answer)
            bar.update()
    bar.close()


def evaluate(model, rows, max_new_tokens: int = 48, limit: int | None = None, progress: bool = True,
             answers: dict[str, str] | None = None, on_answer=None, batch_size: int = 1, engine=None):  # fmt: skip
    """Greedy answers for each row's last turn, scored; returns (summary, predictions). `answers` (row id ->
    text) are taken as given and not generated again (a resumed run); `on_answer(id, text)` sees each new one."""
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    rows = rows[:limit] if limit else rows
    answers = dict(answers or {})
    todo = [(row.id, row.messages[:-1], row.images) for row in rows if row.id not in answers]

    def record(qid, text):
        answers[qid] = text
        if on_answer is not None:
            on_answer(qid, text)

    answer_all(model, todo, gen, record, batch_size, engine, progress)
    scores, predictions = Scores(), []
    for row in rows:
        reference, answer, qtype = row.messages[-1]["content"], answers[row.id], row.raw.get("type", "other")
        correct = scores.add(qtype, answer, reference, row.raw)
        predictions.append({"id": row.id, "type": qtype, "prediction": answer, "reference": reference, "ok": correct})
    return scores.summary(), predictions


def score_answers(task: str, answers: dict[str, dict], annotations: str | None, questions: list[dict] | None) -> dict:
    """Score an answers file (question_id -> LLaVA answer row) with the official `task` scorer."""
    from training.eval_files import read_labels, read_vqav2_annotations

    by_question = {str(q["question_id"]): q for q in questions or []}
    if task == "vqav2":
        if annotations is None:
            raise UsageError("mllm eval score --task vqav2 needs --annotations (the VQAv2 annotation JSON)")
        refs = read_vqav2_annotations(annotations)
        missing = [qid for qid in answers if qid not in refs]
        if missing:
            raise UsageError(f"{len(missing)} answers have no VQAv2 annotation, e.g. question_id {missing[0]}")
        return vqa_scores([(a["text"], *refs[qid]) for qid, a in answers.items()])
    labels = read_labels(annotations) if annotations else {}
    items = []
    for qid, answer in answers.items():
        row = {**by_question.get(qid, {}), **labels.get(qid, {})}
        gold = row.get("label", row.get("answer"))
        if gold is None:
            raise UsageError(f"question_id {qid} has no label: give --annotations (or questions with 'answer')")
        items.append((answer["text"], str(gold), str(row.get("category", "all")), str(row.get("image", qid))))
    if task == "pope":
        return pope_scores([(text, gold, category) for text, gold, category, _ in items])
    if task == "mme":
        return mme_scores(items)
    correct = [normalize_answer(text) == normalize_answer(gold) for text, gold, _, _ in items]
    return {"questions": len(correct), "accuracy": sum(correct) / len(correct) if correct else 0.0}


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv, prog="mllm eval")


def _main(argv: list[str]) -> int:
    if argv[:1] == ["score"]:
        return _score(argv[1:])
    p = Parser(
        prog="mllm eval",
        description="Answer a question set greedily and score it (`mllm eval score ...` scores an answers file).",
    )
    add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="LLaVA JSON / JSONL rows; each row's last gpt turn is the reference")
    source.add_argument("--questions", help="LLaVA evaluation questions (JSONL: question_id, image, text, ...)")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--answers-file", default=None, help="append answers here (LLaVA's format); a rerun resumes")
    p.add_argument("--task", choices=TASKS, default=None, help="with --questions: score the answers at the end")
    p.add_argument("--annotations", default=None, help="references for --task (VQAv2 JSON, POPE / MME labels)")
    p.add_argument("--output", default=None, help="write OUTPUT.json (metrics + predictions) and OUTPUT.md")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=1, help="questions decoded together (through the serving engine)")
    args = p.parse_args(argv)
    if nul := [name for name, value in vars(args).items() if "\0" in str(value)]:  # the OS would raise ValueError
        p.error(f"--{nul[0].replace('_', '-')} holds a NUL byte, which no path can; check it")
    if args.questions and not args.answers_file:
        raise UsageError("mllm eval --questions needs --answers-file (where the answers go, in LLaVA's format)")
    if args.batch_size < 1:
        raise UsageError("mllm eval: --batch-size must be >= 1")
    from training.eval_files import AnswerWriter, read_answers, read_questions

    try:
        rows = read_rows(args.data, args.image_folder) if args.data else None
        questions = read_questions(args.questions) if args.questions else None
        done = read_answers(args.answers_file) if args.answers_file else {}
    except DataError as e:
        raise UsageError(f"mllm eval: {e}") from e
    model, engine = _load(args)
    writer = AnswerWriter(args.answers_file, args.model) if args.answers_file else None
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
    prompts: dict[str, str] = {}
    _write_settings(args, model, gen)

    def on_answer(qid, text):
        if writer is not None:
            writer.write(qid, prompts.get(qid, ""), text, {"max_new_tokens": gen.max_new_tokens, "temperature": 0})

    try:
        if rows is not None:
            rows = rows[: args.limit] if args.limit else rows
            prompts.update({row.id: _last_user_text(row.messages[:-1]) for row in rows})
            summary, predictions = evaluate(
                model, rows, args.max_new_tokens, None, answers={k: v["text"] for k, v in done.items()},
                on_answer=on_answer, batch_size=args.batch_size, engine=engine,
            )  # fmt: skip
            table = markdown_table(summary, title=f"{args.model} on {Path(args.data).name}")
        else:
            questions = questions[: args.limit] if args.limit else questions
            items = [_question_item(q, args.image_folder) for q in questions if str(q["question_id"]) not in done]
            prompts.update({str(q["question_id"]): q["text"] for q in questions})
            answer_all(model, items, gen, on_answer, args.batch_size, engine)
            summary, predictions = {}, []
            if args.task:
                answers = read_answers(args.answers_file)
                wanted = {str(q["question_id"]) for q in questions}
                summary = score_answers(
                    args.task, {k: v for k, v in answers.items() if k in wanted}, args.annotations, questions
                )
            table = json.dumps(summary, indent=2)
    finally:
        if writer is not None:
            writer.close()
    print(table)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"summary": summary, "predictions": predictions}, indent=2))
        out.with_suffix(".md").write_text(table)
    return 0


TASKS = ("vqav2", "pope", "mme", "exact")


def _score(argv: list[str]) -> int:
    from training.eval_files import read_answers, read_questions

    p = Parser(prog="mllm eval score", description="Score an answers file (LLaVA's format) with an official scorer.")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--answers", required=True, help="answers JSONL (question_id, text, ...)")
    p.add_argument("--annotations", default=None, help="VQAv2 annotation JSON, or POPE / MME labels (JSONL)")
    p.add_argument("--questions", default=None, help="the question file (for POPE's category, MME's subtask)")
    args = p.parse_args(argv)
    try:
        answers = read_answers(args.answers)
        if not answers:
            raise UsageError(f"mllm eval score: {args.answers} holds no answers")
        questions = read_questions(args.questions) if args.questions else None
        print(json.dumps(score_answers(args.task, answers, args.annotations, questions), indent=2))
    except DataError as e:
        raise UsageError(f"mllm eval score: {e}") from e
    return 0


def _load(args):
    """The model, and a batcher over it when --batch-size > 1."""
    from mllm.loading import load_model

    load = lambda: load_model(  # noqa: E731
        args.model, device=args.device, quantization=quantization(args), backend=args.backend
    )
    try:
        if args.batch_size > 1:  # loaded on the batcher's model thread, where it will run (one OpenMP team)
            import threading

            batcher = Batcher(None, threading.Lock(), max_batch=args.batch_size)
            batcher.model = batcher.run(load)
            return batcher.model, batcher
        return load(), None
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UsageError(f"mllm eval: cannot load model {args.model!r}: {e}") from e


def _write_settings(args, model, gen: GenerationConfig) -> None:
    """What produced the answers, beside them: model, quantization, template, generation settings."""
    target = args.answers_file or args.output
    if not target:
        return
    settings = {
        "model": args.model,
        "quantization": model.config.llm.quantization,
        "backend": model.backend.name,
        "template": model.config.template,
        "chat_template": model.processor.template,
        "generation": {
            "max_new_tokens": gen.max_new_tokens,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
            "repetition_penalty": gen.repetition_penalty,
            "greedy": gen.temperature == 0,
        },  # fmt: skip
        "questions": args.questions or args.data,
        "limit": args.limit,
    }
    path = Path(target).with_suffix(".settings.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2, default=str))


def _last_user_text(messages: list[dict]) -> str:
    from mllm.session import text_of

    users = [m for m in messages if m["role"] == "user"]
    return text_of(users[-1]) if users else ""


def _question_item(question: dict, image_folder: str | None):
    """A LLaVA evaluation question as (question_id, messages, images)."""
    content = [{"type": "text", "text": question["text"]}]
    images = []
    if question.get("image"):
        folder = Path(image_folder) if image_folder else Path(".")
        images = [str(folder / question["image"])]
        content.insert(0, {"type": "image"})
    return str(question["question_id"]), [{"role": "user", "content": content}], images


if __name__ == "__main__":
    sys.exit(main())
