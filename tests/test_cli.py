"""`mllm chat`: streamed answer with a prompt, interactive commands, one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from app.cli import main
from mllm.checkpoint import save_pretrained


@pytest.fixture
def checkpoint(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path / "ckpt")
    return str(tmp_path / "ckpt")


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(path)
    return str(path)


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def test_prompt_streams_one_answer(checkpoint, image_file, capsys):
    code = main(["chat", "--model", checkpoint, "--image", image_file, "--max-new-tokens", "5", "what color"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.endswith("\n")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "/nope/cat.png", "hi"], "/nope/cat.png: file not found"),
        (["--temperature", "-1", "hi"], "temperature=-1.0 must be >= 0"),
        (["--bogus", "hi"], "unrecognized arguments: --bogus"),
        (["--max-new-tokens", "many", "hi"], "invalid int value: 'many'"),
        (["--load-4bit", "--load-8bit", "hi"], "not allowed with argument"),
        (["--model", "/nope/model", "hi"], "cannot load model '/nope/model'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(["chat", *args]) == 2
    assert message in _one_line(capsys.readouterr().err)


def test_corrupt_image_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    assert main(["chat", "--image", str(bad), "hi"]) == 2
    assert "broken.jpg" in _one_line(capsys.readouterr().err)


def test_unknown_command(capsys):
    assert main(["dance"]) == 2
    assert "unknown command 'dance'" in _one_line(capsys.readouterr().err)


def test_interactive_image_reset_quit(checkpoint, image_file, monkeypatch, capsys):
    lines = iter([f"/image {image_file}", "what color", "/image /nope.png", "/reset", "hello", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", checkpoint, "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("assistant> ") == 2
    assert "(image added; 1 waiting" in captured.err
    assert "/nope.png: file not found" in captured.err
    assert "(conversation cleared)" in captured.err


def test_process_exit_code_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "chat", "--image", str(tmp_path / "missing.png"), "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "missing.png: file not found" in _one_line(result.stderr)
