"""`mllm chat`: streamed answer with a prompt, interactive commands, one-line errors with exit code 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

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


def test_prompt_prints_the_greedy_reply_to_the_image_and_prompt(checkpoint, image_file, tmp_path, capsys):
    from mllm.generation import GenerationConfig, generate
    from mllm.loading import load_model

    code = main(["chat", "--model", checkpoint, "--image", image_file, "--max-new-tokens", "5", "what color"])
    out = capsys.readouterr().out
    assert code == 0
    # The library's reply for the model as `mllm chat` loads it (the CPU default), the image before the question
    # in one user turn, greedy, 5 tokens: the command prints it whole, then a newline, and nothing else.
    model, gen = load_model(checkpoint, device="cpu"), GenerationConfig(max_new_tokens=5)

    def reply(text, image):
        return generate(model, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                        [image], gen=gen)  # fmt: skip

    assert out == reply("what color", image_file) + "\n"
    # Which makes the check worth something: on the tiny model another image or prompt changes the reply.
    blue = tmp_path / "blue.png"
    Image.new("RGB", (20, 20), (0, 0, 255)).save(blue)
    assert out != reply("what color", str(blue)) + "\n" or out != reply("what shape", image_file) + "\n"


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


# ---- mllm ui / mllm api: refusals before anything loads, and what `mllm ui` serves with ---------------
@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["api", "--api-key", ""], {}, "mllm api: --api-key (or MLLM_API_KEY) must not be empty"),
        (["api", "--api-key", "  "], {}, "must not be empty"),
        (["api"], {"MLLM_API_KEY": ""}, "must not be empty"),
        (["api", "--cors-origin", "localhost:3000"], {}, "--cors-origin 'localhost:3000' is not an origin"),
        (["api", "--cors-origin", "http://a.example/app"], {}, "no path"),
        (["ui", "--auth", "ann"], {}, "mllm ui: --auth (or MLLM_UI_AUTH) must be USER:PASSWORD"),
        (["ui", "--auth", "ann:"], {}, "must be USER:PASSWORD with neither part empty"),
        (["ui", "--auth", ":hunter2"], {}, "must be USER:PASSWORD"),
        (["ui"], {"MLLM_UI_AUTH": "ann: "}, "must be USER:PASSWORD"),
        (["ui"], {"MLLM_UI_AUTH": ""}, "must be USER:PASSWORD"),
        (["ui", "--max-upload-mb", "0"], {}, "mllm ui: need a finite --max-upload-mb > 0"),
        (["ui", "--max-upload-mb", "nan"], {}, "--max-upload-mb > 0"),
        (["ui", "--max-upload-mb", "-1"], {}, "--max-upload-mb > 0"),
    ],
)
def test_server_flags_refused_at_start(argv, env, message, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert message in line and "hunter2" not in line  # a password is never echoed


@pytest.fixture
def fake_launch(tmp_path, monkeypatch):
    """`mllm ui` up to the launch: records launch's arguments, and the export folder that exists meanwhile."""
    monkeypatch.setenv("MLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.delenv("MLLM_UI_AUTH", raising=False)
    calls = []

    def launch(demo, host, port, allowed, **kwargs):
        calls.append({"host": host, "port": port, **kwargs})
        calls[-1]["exports"] = list((tmp_path / "gradio").glob("mllm-exports-*"))
        calls[-1]["queue"] = demo._queue.max_size

    monkeypatch.setattr("app.ui.launch", launch)
    return calls


def test_ui_launches_with_login_and_upload_cap(checkpoint, fake_launch, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLLM_UI_AUTH", "ann:pw:with:colons")  # a password may hold ':'
    assert main(["ui", "--model", checkpoint, "--host", "0.0.0.0", "--port", "7999", "--max-upload-mb", "1.5"]) == 0
    (call,) = fake_launch
    assert call["auth"] == ("ann", "pw:with:colons") and call["max_file_size"] == int(1.5 * 2**20)
    assert (call["host"], call["port"], call["queue"]) == ("0.0.0.0", 7999, 16 + 32)  # the engine's defaults
    assert len(call["exports"]) == 1 and not call["exports"][0].exists()  # deleted once the server stopped
    assert "warning" not in capsys.readouterr().out


def test_ui_cleans_up_when_stopped_with_sigterm(checkpoint, fake_launch, monkeypatch):
    def stopped(*args, **kwargs):
        handler = signal.getsignal(signal.SIGTERM)  # what `kill PID` runs while the server is up
        assert handler is not signal.SIG_DFL
        handler(signal.SIGTERM, None)

    monkeypatch.setattr("app.ui.launch", stopped)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["ui", "--model", checkpoint]) == 0
    assert signal.getsignal(signal.SIGTERM) is before
    assert list((Path(os.environ["GRADIO_TEMP_DIR"])).glob("mllm-exports-*")) == []


def test_ui_warns_when_open_to_the_network(checkpoint, fake_launch, capsys):
    from app.api_request import MAX_IMAGE_BYTES

    assert main(["ui", "--model", checkpoint, "--host", "0.0.0.0", "--auth", "ann:pw"]) == 0
    assert "warning" not in capsys.readouterr().out
    assert main(["ui", "--model", checkpoint, "--host", "0.0.0.0"]) == 0
    out = capsys.readouterr().out
    assert "mllm ui: warning: listening on 0.0.0.0 without --auth; anyone who can reach it can use it" in out
    assert fake_launch[-1]["auth"] is None and fake_launch[-1]["max_file_size"] == MAX_IMAGE_BYTES  # 20 MiB


def test_api_warning_is_unchanged(capsys):
    from app.cli import _warn_if_open

    _warn_if_open("mllm api", "127.0.0.1", "--api-key", protected=False)
    _warn_if_open("mllm api", "0.0.0.0", "--api-key", protected=True)
    assert capsys.readouterr().out == ""
    _warn_if_open("mllm api", "0.0.0.0", "--api-key", protected=False)
    assert capsys.readouterr().out == (
        "mllm api: warning: listening on 0.0.0.0 without --api-key; anyone who can reach it can use it\n"
    )
