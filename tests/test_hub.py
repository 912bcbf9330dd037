"""Hub ids (`mllm.hub`) with no network: what is refused and what the user is told."""

from __future__ import annotations

import json
import re
import time

import pytest

from mllm.errors import CheckpointError
from mllm.hub import is_hub_id, local_path


def _files(directory, files: dict[str, str]):
    directory.mkdir()
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def test_what_counts_as_a_hub_id(tmp_path, monkeypatch):
    assert is_hub_id("llava-hf/llava-1.5-7b-hf") and is_hub_id("org/name@v1.0") and is_hub_id("org/name@refs/pr/3")
    assert not is_hub_id("default") and not is_hub_id("./runs/ckpt") and not is_hub_id("/abs/path")
    assert not is_hub_id("~/runs/ckpt") and not is_hub_id("runs/instruct/checkpoint-3")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert local_path(str(tmp_path / "org" / "name")) == str(tmp_path / "org" / "name")  # a path stays a path
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("runs/instruct")  # `org/name` alone reads as a hub id ...
    (tmp_path / "runs").mkdir()
    assert not is_hub_id("runs/instruct")  # ... unless its first part is a directory here


@pytest.mark.parametrize(
    "name", ["runs/instruct", "./runs/instruct", "runs/instruct/final", "~/no-such-run-dir", "typo"]
)
def test_a_missing_local_directory_is_said_so_not_looked_up_on_the_hub(offline_hub, tmp_path, monkeypatch, name):
    from mllm.loading import load_model, load_processor

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for load in (load_model, load_processor):
        with pytest.raises(CheckpointError, match=rf"^{re.escape(name)}: no such directory; check the path \(hub ids"):
            load(name)


def test_a_nul_byte_in_a_model_name_is_a_checkpoint_error(offline_hub):
    from mllm.loading import load_model, load_processor

    for load in (load_model, load_processor, local_path):
        with pytest.raises(CheckpointError, match="NUL byte"):
            load("runs/a\0b")


def test_the_hub_never_lets_a_pickled_adapter_through():
    from huggingface_hub.utils import filter_repo_objects

    from mllm.hub import ALLOWED

    repo = ["adapter/adapter_model.bin", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
            "llm/model.safetensors", "llm/pytorch_model.bin", "training_args.bin", "modeling_x.py"]  # fmt: skip
    fetched = set(filter_repo_objects(repo, allow_patterns=list(ALLOWED)))
    assert fetched == {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "llm/model.safetensors"}


def test_a_repository_with_only_pickled_weights_is_refused(offline_hub, tmp_path):
    old = _files(tmp_path / "old", {"config.json": json.dumps({"model_type": "llava"}), "pytorch_model.bin": "x"})
    offline_hub.publish("someone/old-model", old)
    with pytest.raises(
        CheckpointError,
        match=r"only as pickle files \(pytorch_model.bin\).*AutoModel.from_pretrained\('someone/old-model'\)"
        r".save_pretrained\('old-model-safetensors'\)",
    ):
        local_path("someone/old-model")


def test_a_missing_repository_is_one_clear_error_at_once(offline_hub):
    start = time.perf_counter()
    with pytest.raises(
        CheckpointError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE.*huggingface-cli download"
    ):
        local_path("org/missing")
    assert time.perf_counter() - start < 5


def test_the_cli_says_it_in_one_line_and_exits_2(offline_hub, capsys):
    from app.cli import main

    start = time.perf_counter()
    assert main(["chat", "--model", "org/missing", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "org/missing is not in the Hugging Face cache" in err
    assert time.perf_counter() - start < 5


def test_only_safe_files_are_ever_asked_for(monkeypatch, tmp_path):
    import huggingface_hub

    from mllm import hub

    asked = {}

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False):
        asked.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        (tmp_path / "model.safetensors").write_text("")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert hub.local_path("org/name@v2") == str(tmp_path)
    assert asked["repo_id"] == "org/name" and asked["revision"] == "v2"
    assert not any(p.endswith((".bin", ".py", ".pt", ".pth", ".pkl")) or p == "*" for p in asked["allow_patterns"])


def test_an_mllm_checkpoint_by_hub_id_and_hub_ids_inside_a_config(
    offline_hub, tiny_config, tiny_llama_dir, tiny_clip_dir, tmp_path, images
):
    import torch

    from mllm.assembly import build_model
    from mllm.checkpoint import save_pretrained
    from mllm.config import LLMConfig, VisionConfig
    from mllm.loading import load_model

    offline_hub.publish("org/tiny-llama", tiny_llama_dir, "1" * 40)
    offline_hub.publish("org/tiny-clip", tiny_clip_dir, "2" * 40)
    config = tiny_config.replace(
        vision=VisionConfig(kind="hf", path="org/tiny-clip"), llm=LLMConfig(path="org/tiny-llama")
    )
    torch.manual_seed(0)
    model = build_model(config, device="cpu").eval()  # both parts resolved from the cache by hub id
    save_pretrained(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "mllm_config.json").read_text())["llm"]["path"] == "org/tiny-llama"
    offline_hub.publish("me/tiny-mllm", tmp_path / "ckpt", "3" * 40)
    loaded = load_model("me/tiny-mllm", device="cpu", quantization="none")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color"}]}]
    batch = model.processor.collate([model.processor.encode(messages, images[:1], add_generation_prompt=True)])
    with torch.no_grad():
        want = model(batch["input_ids"], pixel_values=batch["pixel_values"])[0]
        got = loaded(batch["input_ids"], pixel_values=batch["pixel_values"])[0]
    torch.testing.assert_close(got, want)
