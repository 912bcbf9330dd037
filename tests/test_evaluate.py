"""Metric functions on hand-made cases."""

from __future__ import annotations

import pytest

from training.evaluate import Scores, markdown_table, normalize_answer


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Red.", "red"),
        ("  The RED circle! ", "red circle"),
        ("three", "3"),
        ("There are 2 objects.", "there are 2 objects"),
        ("top-left", "top left"),
        ("an orange square", "orange square"),
        ("3.5", "3.5"),
        ("Yes, it is.", "yes it is"),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_accuracy_per_type_and_overall():
    s = Scores()
    s.add("color", "Red.", "red")
    s.add("color", "blue", "red")
    s.add("count", "three", "3")
    s.add("count", "4", "3")
    summary = s.summary()
    assert summary["questions"] == 4 and summary["accuracy"] == 0.5
    assert summary["per_type"]["color"] == {"accuracy": 0.5, "n": 2}
    assert summary["count"] == {"accuracy": 0.5, "n": 2}


def test_yes_no_precision_recall_f1():
    s = Scores()
    # references: yes yes yes no no; predictions: yes yes no yes no
    for pred, ref in [("Yes.", "yes"), ("yes", "yes"), ("no", "yes"), ("yes", "no"), ("No", "no")]:
        s.add("exists", pred, ref)
    yn = s.summary()["yes_no"]
    assert yn["n"] == 5
    assert yn["accuracy"] == pytest.approx(3 / 5)
    assert yn["precision"] == pytest.approx(2 / 3)
    assert yn["recall"] == pytest.approx(2 / 3)
    assert yn["f1"] == pytest.approx(2 / 3)
    assert yn["yes_ratio"] == pytest.approx(3 / 5)


def test_rambling_yes_no_answer_is_a_no():
    s = Scores()
    s.add("exists", "I think there might be", "yes")
    yn = s.summary()["yes_no"]
    assert yn["recall"] == 0.0 and yn["yes_ratio"] == 0.0


def test_markdown_table_lists_every_type():
    s = Scores()
    s.add("shape", "circle", "circle")
    s.add("exists", "no", "yes")
    table = markdown_table(s.summary(), title="demo")
    assert "| shape | 1 | 100.0% |" in table and "| exists | 1 | 0.0% |" in table
    assert "**overall** | 2 | **50.0%**" in table and "F1" in table


# ---- runs: resumable answers files, LLaVA formats, the score subcommand ------------------------------
import json  # noqa: E402
import re  # noqa: E402


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A tiny model checkpoint and a few shapes-world test rows (LLaVA JSON, references in the last turn)."""

    from training.synth import write_dataset

    root = tmp_path_factory.mktemp("eval-run")
    paths = write_dataset(root / "data", n=40, seed=0)
    return root, paths


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_config, tmp_path_factory):
    import torch

    from mllm.assembly import build_model
    from mllm.checkpoint import save_pretrained

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("eval-ckpt") / "ckpt"
    save_pretrained(build_model(tiny_config, device="cpu").eval(), directory)
    return directory


def _eval(ckpt, paths, *extra):
    from training.evaluate import main

    return main(["--model", str(ckpt), "--data", str(paths["test_qa"]), "--image-folder", str(paths["images"]),
                 "--max-new-tokens", "4", "--limit", "8", *extra])  # fmt: skip


def test_a_killed_eval_resumes_to_the_same_scores(shapes, tiny_ckpt, tmp_path, capsys, monkeypatch, caplog):
    from training import eval_files

    root, paths = shapes
    assert _eval(tiny_ckpt, paths, "--answers-file", str(tmp_path / "full.jsonl")) == 0
    uninterrupted = capsys.readouterr().out

    written, real_write = [], eval_files.AnswerWriter.write

    def dies_after_three(self, *args, **kwargs):
        if len(written) == 3:
            raise KeyboardInterrupt  # as if the process were killed after three answers reached the disk
        written.append(args[0])
        real_write(self, *args, **kwargs)

    monkeypatch.setattr(eval_files.AnswerWriter, "write", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        _eval(tiny_ckpt, paths, "--answers-file", str(tmp_path / "resumed.jsonl"))
    answers = tmp_path / "resumed.jsonl"
    assert len(answers.read_text().splitlines()) == 3
    fourth = (tmp_path / "full.jsonl").read_text().splitlines()[3]
    with answers.open("a") as f:
        f.write(fourth[: len(fourth) // 2])  # and it was killed in the middle of writing the fourth
    monkeypatch.setattr(eval_files.AnswerWriter, "write", real_write)
    capsys.readouterr()
    assert _eval(tiny_ckpt, paths, "--answers-file", str(answers)) == 0
    assert f"{answers}: dropped line 4, cut off mid-write" in caplog.text
    assert capsys.readouterr().out == uninterrupted  # the same per-type table
    lines = [json.loads(line) for line in (tmp_path / "resumed.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and len({row["question_id"] for row in lines}) == 8  # nothing answered twice
    assert set(lines[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    settings = json.loads((tmp_path / "resumed.settings.json").read_text())
    assert settings["generation"]["max_new_tokens"] == 4 and settings["generation"]["greedy"]
    from mllm.backends import CPU_DEFAULT

    assert "{%" in settings["chat_template"] and settings["backend"] == CPU_DEFAULT  # the CPU default, recorded


def _answers(path) -> dict[str, str]:
    return {row["question_id"]: row["text"] for row in map(json.loads, path.read_text().splitlines())}


def test_batches_narrower_than_the_bf16_width_give_the_answers_one_at_a_time_gives(shapes, tiny_ckpt, tmp_path, capsys):
    # Under 8 rows every decode step stays on the int4 kernel: each answer bit for bit the one it gets alone, on any
    # model (the tiny random one included, where near-ties are everywhere).
    root, paths = shapes
    assert _eval(tiny_ckpt, paths, "--answers-file", str(tmp_path / "one.jsonl")) == 0
    assert _eval(tiny_ckpt, paths, "--answers-file", str(tmp_path / "four.jsonl"), "--batch-size", "4") == 0
    assert _answers(tmp_path / "one.jsonl") == _answers(tmp_path / "four.jsonl")


@pytest.mark.slow
def test_batch_size_8_gives_the_demo_model_the_same_answers_as_one_at_a_time(tmp_path, monkeypatch, capsys):
    """The README: "On the shapes world's first 200 test questions, `--batch-size 8` gives the same 200 answers as
    one at a time" (the demo model on a CPU, int4). At 8 replies a step and more the products go through the bf16
    copy of the weights, which rounds otherwise than the int4 kernel; the claim is that on these questions no
    answer changes. The figures are read from the README, so a changed sentence is a failing test. (On the tiny
    random model it would not hold: 1 of 12 answers differs at batch 8, a near-tie; the README says a reply can
    differ there, and test_batching.py holds each row's logits to the 1% it states.)"""
    from conftest import readme_figures

    from training.evaluate import Batcher, main
    from training.synth import write_dataset

    n, batch, same = map(int, readme_figures(
        r"On the shapes world's first (\d+) test questions, `--batch-size (\d+)` gives the same (\d+) answers as one at a time"
    ))  # fmt: skip
    assert n == same
    paths = write_dataset(tmp_path / "shapes", n=1100, seed=0)  # 1,100 images hold 267 test questions
    assert len(json.loads(paths["test_qa"].read_text())) >= n
    widths = []

    class Watched(Batcher):
        """The eval's batcher, recording how many replies each decode step carries."""

        def _step(self):
            widths.append(len(self._batch.running))
            super()._step()

    monkeypatch.setattr("training.evaluate.Batcher", Watched)
    args = ["--data", str(paths["test_qa"]), "--image-folder", str(paths["images"]), "--limit", str(n)]
    args += ["--backend", "int4"]  # the claim is the int4 path's: its wide steps take the bf16 copy
    assert main([*args, "--answers-file", str(tmp_path / "one.jsonl")]) == 0
    assert main([*args, "--answers-file", str(tmp_path / "batched.jsonl"), "--batch-size", str(batch)]) == 0
    settings = json.loads((tmp_path / "batched.settings.json").read_text())
    assert settings["model"] == "default" and settings["quantization"] == "int4" and settings["backend"] == "int4"
    assert max(widths) == batch  # the steps really were that wide: through the bf16 copy
    one, batched = _answers(tmp_path / "one.jsonl"), _answers(tmp_path / "batched.jsonl")
    assert len(one) == n and batched == one, [qid for qid in one if batched.get(qid) != one[qid]]


def test_llava_question_files_and_the_score_subcommand(shapes, tiny_ckpt, tmp_path, capsys):
    from training.evaluate import main

    root, paths = shapes
    rows = json.loads(paths["test_qa"].read_text())[:6]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(
        json.dumps({"question_id": f"q{k}", "image": r["image"], "text": r["conversations"][0]["value"].replace("<image>\n", ""),
                    "category": "adversarial" if k % 2 else "random", "answer": r["conversations"][1]["value"]}) + "\n"
        for k, r in enumerate(rows)
    ))  # fmt: skip
    answers = tmp_path / "answers.jsonl"
    args = ["--model", str(tiny_ckpt), "--questions", str(questions), "--image-folder", str(paths["images"]),
            "--answers-file", str(answers), "--max-new-tokens", "3", "--task", "exact"]  # fmt: skip
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["questions"] == 6
    # POPE scoring of an answers file, no model loaded: labels from a label file, splits from the questions.
    pope_answers = tmp_path / "pope_answers.jsonl"
    pope_answers.write_text("".join(json.dumps({"question_id": f"q{k}", "text": t}) + "\n"
                                    for k, t in enumerate(["Yes.", "No, there is not.", "Yes", "no", "Yes", "Yes"])))  # fmt: skip
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"question_id": f"q{k}", "label": v}) + "\n"
                              for k, v in enumerate(["yes", "no", "no", "no", "yes", "yes"])))  # fmt: skip
    assert main(["score", "--task", "pope", "--answers", str(pope_answers), "--annotations", str(labels),
                 "--questions", str(questions)]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    # random (q0, q2, q4): yes/yes, yes/no, yes/yes -> TP 2, FP 1; adversarial (q1, q3, q5): no/no, no/no, yes/yes
    assert result["random"]["accuracy"] == pytest.approx(2 / 3) and result["random"]["precision"] == pytest.approx(
        2 / 3
    )
    assert result["adversarial"]["accuracy"] == 1.0 and result["adversarial"]["yes_ratio"] == pytest.approx(1 / 3)


def test_score_subcommand_errors_are_one_line(tmp_path):
    from mllm.commandline import UsageError
    from training.evaluate import main

    (tmp_path / "a.jsonl").write_text('{"question_id": 1, "text": "yes"}\n')
    with pytest.raises(UsageError, match="needs --annotations"):
        from training.evaluate import _main

        _main(["score", "--task", "vqav2", "--answers", str(tmp_path / "a.jsonl")])
    assert main(["score", "--task", "pope", "--answers", str(tmp_path / "missing.jsonl")]) == 2


@pytest.mark.parametrize("flag", ["--model", "--data", "--answers-file", "--output"])
def test_a_nul_byte_in_a_path_is_one_line_not_a_traceback(tmp_path, capsys, flag):
    from training.evaluate import main

    args = {"--model": "default", "--data": str(tmp_path / "rows.json"), "--answers-file": str(tmp_path / "a.jsonl")}
    args[flag] = str(tmp_path / "x\0y")
    assert main([item for pair in args.items() for item in pair]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{flag} holds a NUL byte" in err


def test_only_a_torn_last_answer_is_forgiven(tmp_path, caplog, monkeypatch):
    import os

    from training.data import DataError
    from training.eval_files import AnswerWriter, read_answers

    path = tmp_path / "answers.jsonl"
    one, two = (
        json.dumps({"question_id": 1, "text": "red"}),
        json.dumps({"question_id": 2, "text": "a\u2028b"}, ensure_ascii=False),
    )
    path.write_text(f"{one}\n{two[:-4]}\n{two}\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not valid JSON"):  # in the middle: an error
        read_answers(path)

    path.write_bytes(f"{one}\n{two}\n{one[:9]}".encode() + b"\0" * 5)  # torn, and padded with NULs by a crash
    assert set(read_answers(path)) == {"1", "2"} and "dropped line 3" in caplog.text
    assert read_answers(path)["2"]["text"] == "a\u2028b"  # a line separator inside an answer is not a line break
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd)))
    writer = AnswerWriter(path, "m")  # cuts the torn line off before appending
    writer.write(3, "p", "blue")
    writer.close()
    assert synced[-1] == path.stat().st_ino  # each answer on disk before the next question
    assert set(read_answers(path)) == {"1", "2", "3"}

    path.write_text(
        f"{one}\n{two}", encoding="utf-8"
    )  # whole, only its newline missing: kept, and the writer adds the newline
    assert set(read_answers(path)) == {"1", "2"}
    AnswerWriter(path, "m").close()
    assert path.read_text(encoding="utf-8") == f"{one}\n{two}\n"
