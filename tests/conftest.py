"""Shared fixtures: tiny random checkpoints built here and loaded by path, as a hub id would be."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings as hypothesis_settings
from PIL import Image

# Tests never reach a hub; any attempt fails fast instead of hanging (set before transformers is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from mllm.assembly import build_model  # noqa: E402
from mllm.tiny import build_clip, build_llama  # noqa: E402

# Hypothesis: in CI (the CI environment variable set) every run draws the same examples and keeps no database of
# failing ones, so a red run is red again on the next try and a green one does not depend on the draw; a
# failure found that way belongs in the test as an explicit @example. Locally it explores as usual.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
hypothesis_settings.register_profile("dev")
HYPOTHESIS_PROFILE = "ci" if os.environ.get("CI") else "dev"
hypothesis_settings.load_profile(HYPOTHESIS_PROFILE)

README = Path(__file__).parent.parent / "README.md"


def readme_figures(pattern: str) -> tuple[str, ...]:
    """The groups of `pattern` in README.md, its line breaks and runs of spaces read as one space: the figures a
    test checks come from the README itself, so a changed figure is a failing test."""
    import re

    text = " ".join(README.read_text().split())
    match = re.search(pattern, text)
    assert match, f"README.md no longer says /{pattern}/: update the test with the sentence"
    return match.groups()


def pytest_terminal_summary(terminalreporter) -> None:
    # At the end, where `pytest -q` still prints (it drops the header).
    terminalreporter.write_line(f"hypothesis profile: {HYPOTHESIS_PROFILE} (CI={os.environ.get('CI', '')!r})")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return build_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_config(tiny_llama_dir, tiny_clip_dir):
    from mllm.config import LLMConfig, MLLMConfig, VisionConfig

    return MLLMConfig(
        vision=VisionConfig(kind="hf", path=str(tiny_clip_dir)),
        llm=LLMConfig(path=str(tiny_llama_dir)),
        template="auto",
    )


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return build_model(tiny_config, device="cpu").eval()


def tiny_model_as(kind: str, tiny_config, tmp_path_factory):
    """The tiny model as `float32` (transformers' forward) or as `cpu-default` loads it back from a checkpoint
    (llama.cpp): the two backends the API tests serve."""
    from mllm.checkpoint import save_pretrained
    from mllm.loading import load_model

    torch.manual_seed(0)
    model = build_model(tiny_config, device="cpu").eval()
    if kind == "cpu-default":
        directory = tmp_path_factory.mktemp("ckpt") / "ckpt"
        save_pretrained(model, directory)
        model = load_model(str(directory), device="cpu")
    return model


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from a second thread, and on a busy 2-core machine it costs 10-20x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images() -> list[Image.Image]:
    """Two small distinct RGB images."""
    return [Image.new("RGB", (40, 30), (220, 30, 30)), Image.new("RGB", (24, 24), (30, 30, 220))]


class OfflineHub:
    """A temporary Hugging Face cache; `publish` puts a directory in it as `huggingface_hub` keeps a downloaded
    repository (models--org--name/snapshots/<commit>/, refs/main naming the commit)."""

    def __init__(self, cache: Path):
        self.cache = cache

    def publish(self, repo_id: str, source: Path, commit: str = "a" * 40) -> None:
        import shutil

        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(source, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> OfflineHub:
    """An empty Hugging Face cache, and no network: HF_HUB_OFFLINE=1."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return OfflineHub(cache)
