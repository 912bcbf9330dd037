"""The evaluation file formats people already have: LLaVA's question and answer files, VQAv2 annotations,
POPE / MME label files. Plain readers and one append-only writer; no model here.

- Questions (LLaVA's `llava_*.jsonl`): one JSON object per line, `question_id`, `image`, `text`, optional
  `category` (POPE's split, MME's subtask) and any reference field (`answer` / `label`).
- Answers (LLaVA's answer files): `question_id`, `prompt`, `text`, `answer_id`, `model_id`, `metadata`.
- VQAv2 annotations (`v2_mscoco_*_annotations.json`): `{"annotations": [{"question_id", "answer_type",
  "answers": [{"answer": ...} x 10]}]}`.
- Labels (POPE's `coco_pope_*.json`, MME's ground truth): JSON lines (or a JSON list) with `question_id` and
  `label` / `answer`, optional `category` and `image`.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from mllm.atomic import append_durably
from training.data import DataError

logger = logging.getLogger(__name__)


def read_json_lines(path: str | Path, appended: bool = False) -> list[dict]:
    """A JSON list, or one JSON object per line (blank lines skipped); a bad line is named with its number.

    `appended`: a file written one line at a time (an answers file, metrics.jsonl), where a kill mid-write leaves
    the last line cut short. That line is dropped, with a warning naming the file; a bad line anywhere else is
    still an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = path.read_bytes()
    rows = _json_list(path, data) if data.lstrip().startswith(b"[") else _json_lines(path, data, appended)
    if not all(isinstance(row, dict) for row in rows):
        raise DataError(f"{path}: every entry must be a JSON object")
    return rows


def _json_list(path: Path, data: bytes) -> list:
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text; save it as UTF-8") from e


def _json_lines(path: Path, data: bytes, appended: bool) -> list:
    # Split on newlines only: str.splitlines would also split inside an answer holding U+2028 or U+0085.
    lines = [(number, line) for number, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    rows = []
    for number, line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError as e:  # not JSON, or a multi-byte character cut in two
            if appended and number == lines[-1][0]:
                logger.warning("%s: dropped line %d, cut off mid-write by a killed run", path, number)
                break
            why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
            raise DataError(f"{path}:{number}: not valid JSON ({why}); each line must be one JSON object") from e
    return rows


def read_questions(path: str | Path) -> list[dict]:
    """LLaVA evaluation questions; each needs `question_id` and `text` (and `image` unless text-only)."""
    rows = read_json_lines(path)
    for number, row in enumerate(rows, 1):
        missing = [k for k in ("question_id", "text") if k not in row]
        if missing:
            raise DataError(f"{path}: question {number} lacks {', '.join(missing)} (LLaVA's question format)")
    ids = [str(row["question_id"]) for row in rows]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: question_id values repeat; each question needs its own")
    return rows


def read_answers(path: str | Path) -> dict[str, dict]:
    """An answers file by question_id (a later line for the same id wins, as a resumed run appends; a last line
    a kill cut short is dropped)."""
    if not Path(path).is_file():
        return {}
    answers = {}
    for row in read_json_lines(path, appended=True):
        if "question_id" not in row or "text" not in row:
            raise DataError(f"{path}: an answer lacks question_id or text (LLaVA's answer format)")
        answers[str(row["question_id"])] = row
    return answers


def read_vqav2_annotations(path: str | Path) -> dict[str, tuple[list[str], str]]:
    """question_id -> (the 10 human answers, answer_type)."""
    data = json.loads(Path(path).read_text(encoding="utf-8")) if Path(path).is_file() else None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: not a VQAv2 annotation file (a JSON object with an 'annotations' list)")
    return {
        str(a["question_id"]): ([x["answer"] for x in a["answers"]], a.get("answer_type", "other"))
        for a in data["annotations"]
    }


def read_labels(path: str | Path) -> dict[str, dict]:
    """question_id -> its label row (`label` or `answer`, optional `category`, `image`)."""
    labels = {}
    for row in read_json_lines(path):
        if "question_id" not in row or not ("label" in row or "answer" in row):
            raise DataError(f"{path}: a label lacks question_id or label/answer")
        labels[str(row["question_id"])] = row
    return labels


class AnswerWriter:
    """Appends LLaVA-format answers one line at a time, each on disk before the next question, so a killed run
    keeps all it has answered (and loses at most the line being written)."""

    def __init__(self, path: str | Path, model_id: str):
        self.path, self.model_id = Path(path), model_id
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _end_at_a_line(self.path)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, question_id, prompt: str, text: str, metadata: dict | None = None) -> None:
        row = {"question_id": question_id, "prompt": prompt, "text": text, "answer_id": uuid.uuid4().hex,
               "model_id": self.model_id, "metadata": metadata or {}}  # fmt: skip
        append_durably(self._file, json.dumps(row, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._file.close()


def _end_at_a_line(path: Path) -> None:
    """Make an answers file end with a complete line before more is appended: a torn last line (the one
    `read_answers` drops) is cut off, a complete one missing its newline gets it. Otherwise the next answer
    would be glued onto it, a bad line in the middle of the file."""
    if not path.is_file():
        return
    with path.open("r+b") as f:
        data = f.read()
        content = data.rstrip()
        start = content.rfind(b"\n") + 1  # where the last line begins
        if not content or (data.endswith(b"\n") and _is_json(content[start:])):
            return
        if _is_json(content[start:]):
            f.write(b"\n")
        else:
            f.truncate(start)
        f.flush()
        os.fsync(f.fileno())


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True
