"""`mllm data validate`: every bad row named on its own line, summary counts, token checks, exit codes."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mllm.checkpoint import save_pretrained
from training.validate import main, validate


def _row(rid: str, question: str = "<image>\nwhat color is the circle", answer: str = "the circle is red", **extra):
    row = {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if question.count("<image>"):
        row["image"] = "red.png"
    row.update(extra)
    return row


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(images / "red.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(images / "blue.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (tmp_path / "outside.png").write_bytes((images / "red.png").read_bytes())
    return images


def _write_jsonl(path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def _run(capsys, argv) -> tuple[int, list[str], str]:
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out.splitlines(), captured.err


def _lines_for(lines: list[str], where: str) -> list[str]:
    return [line for line in lines if line.startswith(f"{where}: ")]


def test_clean_file_passes(tmp_path, folder, capsys):
    rows = [
        _row("a"),
        _row("b", "<image>\nand this one?", "blue", image=["blue.png"]),
        _row("c", "hello, how are you today?", "i am fine, thank you."),
        {
            "id": "d",
            "image": ["red.png", "blue.png"],
            "conversations": [
                {"from": "system", "value": "be brief"},
                {"from": "human", "value": "<image>\n<image>\nsame colour?"},
                {"from": "gpt", "value": "no"},
                {"from": "human", "value": "which is red"},
                {"from": "gpt", "value": "the first"},
            ],
        },
    ]
    data = _write_jsonl(tmp_path / "clean.jsonl", rows)
    code, lines, err = _run(capsys, [data, "--image-folder", str(folder)])
    assert code == 0, lines
    assert lines == ["checked 4 rows: all good"]
    assert err == ""


def test_json_list_file_is_read_with_row_numbers(tmp_path, folder, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([_row("a"), {"conversations": [{"from": "human", "value": "hi"}]}]))
    code, lines, _ = _run(capsys, [str(data), "--image-folder", str(folder)])
    assert code == 1
    assert len(_lines_for(lines, "row 1")) == 1
    assert "must end with a gpt answer" in _lines_for(lines, "row 1")[0]


def test_each_defect_is_named_on_its_own_line(tmp_path, folder, capsys):
    rows = [
        _row("good"),
        '{"id": "broken", "conversations": [',  # line 2: invalid JSON
        "[1, 2, 3]",  # line 3: not an object
        {"id": "noconv", "image": "red.png"},
        {"id": "role", "conversations": [{"from": "humann", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"id": "order", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "yo"}]},
        _row("empty", answer="  "),
        _row("missing", image="nope.png"),
        _row("escape", image="../outside.png"),
        _row("corrupt", image="broken.png"),
        _row("toomany", "<image>\n<image>\nwhat"),
        _row("toofew", "what color", image="red.png"),
        {"id": "endshuman", "conversations": [{"from": "human", "value": "hi"}]},
        _row("last-good", "<image>\nhow many objects", "three", image="blue.png"),
    ]
    data = _write_jsonl(tmp_path / "bad.jsonl", rows)
    code, lines, _ = _run(capsys, [data, "--image-folder", str(folder)])
    assert code == 1
    *problem_lines, summary = lines
    expected = {
        "line 2": "invalid JSON",
        "line 3": "JSON object, got list",
        "noconv": "'conversations'",
        "role": "'humann'",
        "order": "alternate",
        "empty": "empty",
        "missing": "'nope.png' not found",
        "escape": "escapes the image folder",
        "corrupt": "unreadable image broken.png",
        "toomany": "2 <image> placeholder(s) but 1 image(s)",
        "toofew": "0 <image> placeholder(s) but 1 image(s)",
        "endshuman": "last turn is from human",
    }
    for where, needle in expected.items():
        found = _lines_for(problem_lines, where)
        assert len(found) == 1, (where, problem_lines)
        assert needle in found[0], found[0]
    assert len(problem_lines) == len(expected)
    assert not _lines_for(lines, "good") and not _lines_for(lines, "last-good")
    assert summary.startswith("checked 14 rows: 12 bad (")
    for part in ("1 invalid JSON", "1 not an object", "1 missing image", "1 empty answer", "2 placeholder count"):
        assert part in summary, summary


def test_invalid_json_line_does_not_stop_the_others(tmp_path, folder):
    data = _write_jsonl(tmp_path / "d.jsonl", [_row("a"), "{not json", "", _row("b", image="nope.png")])
    report = validate(data, folder)
    assert report.rows_total == 3
    assert [where for where, _ in report.problems] == ["line 2", "b"]
    assert report.problems[0][1].startswith("invalid JSON (")  # the line number is not repeated in the reason


def test_row_without_id_is_named_by_line(tmp_path, folder):
    row = _row("x", image="nope.png")
    del row["id"]
    report = validate(_write_jsonl(tmp_path / "d.jsonl", [_row("a"), row]), folder)
    assert report.problems == [("line 2", f"image file 'nope.png' not found under {folder.resolve()}")]


def test_a_row_with_several_problems_reports_all_of_them(tmp_path, folder):
    row = {
        "id": "multi",
        "image": ["nope.png", "../outside.png", "broken.png"],
        "conversations": [{"from": "bot", "value": "<image>\nhi"}, {"from": "gpt", "value": ""}],
    }
    report = validate(_write_jsonl(tmp_path / "d.jsonl", [row]), folder)
    assert report.rows_total == report.rows_bad == 1
    kinds = dict(report.kinds)
    assert kinds == {
        "wrong role": 1,
        "empty answer": 1,
        "missing image": 1,
        "image outside folder": 1,
        "unreadable image": 1,
        "placeholder count": 1,
    }
    assert all(where == "multi" for where, _ in report.problems)
    assert len(report.problems) == 6


def test_images_without_a_folder_are_reported(tmp_path):
    report = validate(_write_jsonl(tmp_path / "d.jsonl", [_row("a")]), None)
    assert report.problems == [("a", "has image 'red.png' but no --image-folder was given")]


def test_bad_image_field_is_reported(tmp_path, folder):
    report = validate(_write_jsonl(tmp_path / "d.jsonl", [_row("a", image=3)]), folder)
    assert report.problems == [("a", "'image' must be a file name or a list of file names")]


def test_exit_2_for_usage_errors(tmp_path, folder, capsys):
    code, out, err = _run(capsys, [str(tmp_path / "nope.jsonl"), "--image-folder", str(folder)])
    assert code == 2 and out == []
    assert len(err.strip().splitlines()) == 1 and "does not exist" in err
    data = _write_jsonl(tmp_path / "d.jsonl", [_row("a")])
    assert _run(capsys, [data, "--image-folder", str(tmp_path / "nofolder")])[0] == 2
    assert _run(capsys, [data, "--max-length", "0"])[0] == 2
    code, _, err = _run(capsys, [data, "--bogus"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, [data, "--model", str(tmp_path / "no-model")])
    assert code == 2 and "cannot load model" in err


def test_json_file_that_is_not_a_list_exits_1(tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text('{"id": "a"}')
    code, lines, _ = _run(capsys, [str(data)])
    assert code == 1 and len(lines) == 1 and "expected a JSON list" in lines[0]


# ---- with the tiny model's processor ------------------------------------------------------------
def test_token_stats_with_processor(tiny_model, tmp_path, folder):
    rows = [_row("a"), _row("b", "<image>\nhow many objects are there in the image", "three", image="blue.png")]
    processor = tiny_model.processor
    limit_before = processor.max_length
    report = validate(_write_jsonl(tmp_path / "d.jsonl", rows), folder, processor)
    assert report.ok and report.rows_total == 2
    assert len(report.lengths) == len(report.shares) == 2
    for row, length, share in zip(rows, report.lengths, report.shares):
        conversation = [{"role": "user", "content": row["conversations"][0]["value"]}]
        conversation.append({"role": "assistant", "content": row["conversations"][1]["value"]})
        encoded = processor.encode(conversation, [row["image"]])
        assert length == len(encoded.input_ids)
        assert share == pytest.approx(encoded.num_supervised / length)
    assert report.longest == max(report.lengths) and 0 < report.mean_share < 1
    assert f"max {report.longest}" in report.summary() and "supervised share" in report.summary()
    assert processor.max_length == limit_before  # the caller's processor is not changed


def test_truncation_that_drops_every_answer_token_is_bad(tiny_model, tmp_path, folder):
    long_answer = "the circle is red and the square is blue " * 4
    rows = [_row("short", "what color", "red"), _row("long", answer=long_answer)]
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    full = validate(data, folder, tiny_model.processor)
    short_len, long_len = full.lengths
    assert full.ok and short_len < long_len
    prompt_len = len(
        tiny_model.processor.encode(
            [{"role": "user", "content": "<image>\nwhat color is the circle"}], ["x"], add_generation_prompt=True
        ).input_ids
    )
    assert prompt_len >= short_len  # the limit below keeps the short row whole and cuts the long one before its answer
    report = validate(data, folder, tiny_model.processor, max_length=short_len)
    assert report.problems == [
        ("long", f"all answer tokens truncated (row is {long_len} tokens, max length {short_len})")
    ]
    assert report.rows_bad == 1 and report.truncated == 1 and report.kinds == {"answer truncated": 1}
    assert report.shares[1] == 0.0


def test_template_error_is_reported(tiny_model, tmp_path, folder):
    processor = tiny_model.processor
    rows = [
        _row("many", "<image>" * (processor.max_images + 1) + "what", image=["red.png"] * (processor.max_images + 1))
    ]
    report = validate(_write_jsonl(tmp_path / "d.jsonl", rows), folder, processor)
    assert len(report.problems) == 1
    where, reason = report.problems[0]
    assert where == "many" and reason.startswith("template rendering failed:") and "at most" in reason


def test_min_supervised_share(tiny_model, tmp_path, folder):
    data = _write_jsonl(tmp_path / "d.jsonl", [_row("a", answer="red")])
    share = validate(data, folder, tiny_model.processor).shares[0]
    assert validate(data, folder, tiny_model.processor, min_supervised_share=share / 2).ok
    report = validate(data, folder, tiny_model.processor, min_supervised_share=min(0.99, share * 2))
    assert report.kinds == {"low supervised share": 1}


def test_cli_with_model_and_max_length(tiny_model, tmp_path, folder, capsys):
    save_pretrained(tiny_model, tmp_path / "ckpt")
    rows = [_row("ok", "what color", "red"), _row("long", answer="the circle is red and the square is blue " * 4)]
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    code, lines, _ = _run(capsys, [data, "--image-folder", str(folder), "--model", str(tmp_path / "ckpt")])
    assert code == 0 and len(lines) == 1
    assert lines[0].startswith("checked 2 rows: all good; mean ") and "supervised share" in lines[0]
    short_len = validate(data, folder, tiny_model.processor).lengths[0]
    argv = [data, "--image-folder", str(folder), "--model", str(tmp_path / "ckpt"), "--max-length", str(short_len)]
    code, lines, _ = _run(capsys, argv)
    assert code == 1
    assert len(_lines_for(lines, "long")) == 1 and "all answer tokens truncated" in lines[0]
    assert lines[-1].startswith("checked 2 rows: 1 bad (1 answer truncated); mean ")
    assert f"1 truncated to {short_len}" in lines[-1]


def test_cli_max_length_without_a_model_counts_with_the_default_tokenizer(tmp_path, folder, capsys):
    """--max-length alone is never silently ignored: tokens are counted with the default model's processor
    (its tokenizer and template only; no weights are loaded)."""
    rows = [_row("ok", "what color", "red"), _row("long", answer="the circle is red and the square is blue " * 40)]
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    code, lines, _ = _run(capsys, [data, "--image-folder", str(folder), "--max-length", "80"])
    assert code == 0 and len(lines) == 1, lines  # the long row keeps some answer tokens: truncated, not bad
    assert "1 truncated to 80" in lines[0]
    code, lines, _ = _run(capsys, [data, "--image-folder", str(folder), "--max-length", "60"])
    assert code == 1 and "all answer tokens truncated" in _lines_for(lines, "long")[0], lines
