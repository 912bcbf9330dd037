"""Hostile and malformed input through the command line and the UI's engine: each gets one clear line (CLI:
exit 2, no traceback) or a ChatError with its code (engine), and the next good request still works."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from app.cli import main
from app.engine import ChatEngine
from app.scheduling import ChatError
from mllm.checkpoint import save_pretrained
from mllm.generation import GenerationConfig


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims to be `width` x `height` (no pixel data): a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _png(size=(20, 20), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


BAD_IMAGES = {
    "empty": b"",
    "text": b"this is not an image",
    "truncated": _png()[:40],
    "bomb": _png_header(100_000, 100_000),
    "zero-width": _png_header(0, 10),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_config):
    import torch

    from mllm.assembly import build_model

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_pretrained(build_model(tiny_config, device="cpu").eval(), directory)
    return str(directory)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_cli_bad_image_is_one_line_and_exit_2(checkpoint, tmp_path, capsys, kind):
    path = tmp_path / f"{kind}.png"
    path.write_bytes(BAD_IMAGES[kind])
    assert main(["chat", "--model", checkpoint, "--image", str(path), "hi"]) == 2
    assert str(path) in _one_line_error(capsys)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["chat", "--image", "/no/such/file.png", "hi"], "/no/such/file.png"),
        (["chat", "--model", "/no/such/model", "hi"], "cannot load model"),
        (["chat", "--max-new-tokens", "0", "hi"], "max_new_tokens"),
        (["chat", "--temperature", "-1", "hi"], "temperature"),
        (["chat", "--top-p", "2", "hi"], "top_p"),
        (["chat", "--seed", str(2**70), "--temperature", "1", "hi"], "seed"),
        (["chat", "--load-4bit", "--load-8bit", "hi"], "not allowed with"),
        (["chat", "--bogus", "hi"], "unrecognized arguments"),
        (["nosuchcommand"], "unknown command"),
        (["data"], "choose a subcommand"),
        (["data", "validate", "/no/such.json"], "does not exist"),
        (["train", "--data", "x.json", "--output", "out"], "give --stage"),
        (["export", "/no/such", "/tmp/out", "--format", "hf-llava"], "does not exist"),
        (["convert", "--from", "llava", "/no/such", "/tmp/out"], "not a directory"),
        (["api", "--max-concurrency", "0"], "--max-concurrency"),
    ],
)
def test_cli_usage_errors_are_one_line_and_exit_2(capsys, argv, says):
    assert main(argv) == 2
    assert says in _one_line_error(capsys)


def test_cli_over_long_prompt_and_image_count(checkpoint, tmp_path, capsys):
    assert main(["chat", "--model", checkpoint, "hello " * 2000]) == 2
    assert "limit of 512" in _one_line_error(capsys)
    image = tmp_path / "ok.png"
    image.write_bytes(_png())
    assert main(["chat", "--model", checkpoint, *["--image", str(image)] * 9, "hi"]) == 2
    assert "at most 8" in _one_line_error(capsys)
    assert main(["chat", "--model", checkpoint, "--max-new-tokens", "2", "--image", str(image), "hi"]) == 0


@pytest.fixture
def engine(tiny_model):
    return ChatEngine(tiny_model, max_concurrency=2, max_queue=2, gen=GenerationConfig(4))


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_engine_bad_image_is_a_chat_error_and_leaves_no_trace(engine, kind):
    conv = engine.new_conversation()
    with pytest.raises(ChatError) as err:
        engine.stream(conv, "what is this", [BAD_IMAGES[kind]])
    assert err.value.code == "invalid_image" and "image 1" in str(err.value)
    assert engine.history(conv) == []
    "".join(engine.stream(conv, "hello"))
    assert [turn.text for turn in engine.history(conv)] == ["hello"]  # the conversation goes on


@pytest.mark.parametrize(
    ("text", "images", "code"),
    [
        ("", [], "invalid_request"),
        ("hi \ud800", [], "invalid_request"),
        ("<image> twice <image>", [], "invalid_request"),
        ("hello " * 2000, [], "context_length_exceeded"),
        ("many", [_png()] * 9, "too_many_images"),
    ],
)
def test_engine_bad_turns_get_their_code_and_the_engine_answers_on(engine, text, images, code):
    conv = engine.new_conversation()
    with pytest.raises(ChatError) as err:
        engine.stream(conv, text, images)
    assert err.value.code == code, err.value
    assert engine.history(conv) == []
    reply = "".join(engine.stream(conv, "what color", [_png()]))
    assert isinstance(reply, str) and len(engine.history(conv)) == 1
