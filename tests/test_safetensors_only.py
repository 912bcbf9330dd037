"""Weights are read from safetensors only: a directory whose weights are pickles (`*.bin`, `*.pt`, ...) is refused by
name, before anything unpickles it, with a command that converts it - and that command works."""

from __future__ import annotations

import ast
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mllm.config import LLMConfig, LoraConfig, VisionConfig
from mllm.errors import CheckpointError
from mllm.llm import attach_lora, load_llm

REPO = Path(__file__).resolve().parents[1]
PICKLE_NAMES = ["pytorch_model.bin", "model.pt", "weights.pth", "model.ckpt", "state.pkl"]


class Canary:
    """Unpickling it creates `marker`: proof that something unpickled the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def pickled_only(source: Path, directory: Path, weights: str, marker: Path) -> Path:
    """`source`'s JSON files (configs) beside a booby-trapped pickle named `weights`, and no safetensors."""
    directory.mkdir()
    for config in source.glob("*.json"):
        shutil.copy(config, directory)
    (directory / weights).write_bytes(pickle.dumps(Canary(marker)))
    return directory


def run_fix(error: pytest.ExceptionInfo) -> None:
    """Run the `python -c "..."` the error message gives."""
    code = re.search(r'python -c "(.*?)"', str(error.value)).group(1)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True)


@pytest.mark.parametrize("weights", PICKLE_NAMES)
def test_an_llm_of_pickles_is_refused_by_name_before_anything_unpickles(tiny_llama_dir, tmp_path, weights):
    directory = pickled_only(tiny_llama_dir, tmp_path / "llm", weights, tmp_path / "unpickled")
    with pytest.raises(CheckpointError, match=rf"{directory} has its weights only as pickle files \({weights}\)") as e:
        load_llm(LLMConfig(path=str(directory)))
    assert f"LlamaForCausalLM.from_pretrained('{directory}').save_pretrained('{directory}-safetensors')" in str(e.value)
    assert not (tmp_path / "unpickled").exists()


def test_the_llm_conversion_command_works(tiny_llama_dir, tmp_path):
    directory = tmp_path / "llm"
    shutil.copytree(tiny_llama_dir, directory)
    state = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")  # an older transformers' pickled save
    with pytest.raises(CheckpointError) as e:
        load_llm(LLMConfig(path=str(directory)))
    run_fix(e)
    converted = load_llm(LLMConfig(path=f"{directory}-safetensors"))
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in state.items())


def test_a_vision_tower_of_pickles_is_refused(tiny_clip_dir, tmp_path):
    from mllm.vision import build_vision

    directory = pickled_only(tiny_clip_dir, tmp_path / "clip", "pytorch_model.bin", tmp_path / "unpickled")
    with pytest.raises(CheckpointError, match=r"pickle files \(pytorch_model.bin\).*CLIPVisionModel.from_pretrained"):
        build_vision(VisionConfig(kind="hf", path=str(directory)))
    assert not (tmp_path / "unpickled").exists()


def test_a_lora_adapter_is_read_from_safetensors_only(tiny_llama_dir, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    llm = load_llm(LLMConfig(path=str(tiny_llama_dir)))
    adapter = tmp_path / "adapter"
    get_peft_model(llm, PeftLoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(
        adapter
    )
    weights = load_file(adapter / "adapter_model.safetensors")

    # Beside the safetensors, peft's pickle is never read.
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Canary(tmp_path / "unpickled")))
    attach_lora(load_llm(LLMConfig(path=str(tiny_llama_dir))), LoraConfig(), adapter_path=str(adapter))
    assert not (tmp_path / "unpickled").exists()

    # Alone, it is refused with the command that converts it, and that command works.
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(weights, adapter / "adapter_model.bin")
    base = load_llm(LLMConfig(path=str(tiny_llama_dir)))
    with pytest.raises(CheckpointError, match=r"pickle files \(adapter_model.bin\).*load_peft_weights") as e:
        attach_lora(base, LoraConfig(), adapter_path=str(adapter))
    run_fix(e)
    (adapter / "adapter_model.bin").unlink()
    loaded = attach_lora(base, LoraConfig(), adapter_path=str(adapter))
    lora = {k: v for k, v in loaded.state_dict().items() if "lora_A" in k}
    assert len(lora) == 2 and all(torch.equal(v, weights[k.replace(".default", "")]) for k, v in lora.items())


def test_a_qformer_text_init_of_pickles_is_refused(tmp_path):
    import json

    from training.qformer_pretrain import QFormerPretrainer

    source = tmp_path / "bert-json"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    directory = pickled_only(source, tmp_path / "bert", "pytorch_model.bin", tmp_path / "unpickled")
    with pytest.raises(CheckpointError, match=r"pickle files \(pytorch_model.bin\).*BertModel.from_pretrained"):
        QFormerPretrainer.init_text_from_bert(None, directory)  # refused before the model is looked at
    assert not (tmp_path / "unpickled").exists()


def test_every_torch_load_is_weights_only():
    """Unpickling anything else than tensors can run code: no `torch.load` in the package without weights_only=True."""
    calls = []
    for file in [*REPO.glob("mllm/**/*.py"), *REPO.glob("training/**/*.py"), *REPO.glob("app/**/*.py")]:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                weights_only = {k.arg: ast.unparse(k.value) for k in node.keywords}.get("weights_only")
                calls.append((f"{file.relative_to(REPO)}:{node.lineno}", weights_only))
    assert calls and all(weights_only == "True" for _, weights_only in calls), calls
