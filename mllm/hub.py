"""Models by hub name: `org/name` (or `org/name@revision`) becomes a local directory, safely.

`local_path(name)` leaves an existing path alone and downloads a hub repository through `huggingface_hub`
(`snapshot_download`, its progress bar, its cache, `HF_HUB_OFFLINE=1` honoured): only the files a model
needs (safetensors weights, JSON configs, tokenizer and processor files, chat templates), never pickled
`.bin` / `.pt` weights and never code, so nothing in a repository can run here. What it returns is then
recognised by its config like any directory (an mllm checkpoint, a llava-hf / BLIP-2 / InstructBLIP one,
or a plain LLM / vision tower), never by its name.

`require_safetensors(directory)` / `require_safetensors_adapter(directory)` refuse a local directory whose
weights are only pickles, by name, with the command that converts them: every loader of weights calls one
before transformers / peft (themselves told `use_safetensors=True` where they take it) read anything.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from pathlib import Path

from mllm.errors import CheckpointError

# What a model directory needs; everything else (pickles, code, images, ONNX / GGUF exports) stays remote.
# `*` matches across `/` (fnmatch), so the same patterns take the files of subfolders: an mllm checkpoint's
# adapter/ (adapter_model.safetensors + adapter_config.json, never peft's pickled adapter_model.bin), llm/, vision/.
ALLOWED = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.model",  # sentencepiece
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
)
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def looks_like_path(name: str) -> bool:
    """Whether `name` is meant as a path on this machine, not a hub id: it starts with `.`, `/` or `~`, or its
    first part is a local directory (`runs/instruct` beside a `runs/` folder). `org/name` alone is a hub id."""
    if name.startswith((".", "/", "~")):
        return True
    first = name.partition("/")[0]
    return first != name and Path(first).is_dir()


def is_hub_id(name: str) -> bool:
    """`org/name` or `org/name@revision` that is not a path on this machine."""
    return bool(HUB_ID.match(name)) and not Path(name).exists() and not looks_like_path(name)


def local_path(name: str) -> str:
    """`name` itself if it is not a hub id; else the local snapshot of that repository (downloaded if needed)."""
    if "\0" in name:  # the OS refuses it anyway, with a ValueError that names nothing
        raise CheckpointError(f"{name!r} holds a NUL byte, which no path or hub id can; check the model name")
    if not is_hub_id(name):
        return name
    repo_id, _, revision = name.partition("@")
    return str(_snapshot(repo_id, revision or None))


def _snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        folder = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=list(ALLOWED), local_files_only=offline)
        )
    except GatedRepoError as e:
        raise CheckpointError(
            f"{where} is gated on the Hugging Face hub: accept its terms on huggingface.co and log in "
            "(`huggingface-cli login`), then try again"
        ) from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"{where} is not a model on the Hugging Face hub (or it is private); check the name"
        ) from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"{where}: no such revision; give a branch, tag or commit of that repository") from e
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{where} is not in the Hugging Face cache and the hub cannot be reached"
            + (" (HF_HUB_OFFLINE is set)" if offline else "")
            + f"; fetch it once with network access (`huggingface-cli download {repo_id}`) or give a local directory"
        ) from e
    except (OSError, ValueError) as e:  # connection failures surface as OSError subclasses
        raise CheckpointError(f"{where}: could not download it ({type(e).__name__}: {e}); check the network") from e
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    if not any(f.endswith(".safetensors") for f in files):
        remote = _remote_files(repo_id, revision) if not offline else []
        if pickled := _pickled_only(files + remote):
            raise _pickle_error(
                where, pickled, _resave_command(folder, repo_id, f"{repo_id.split('/')[-1]}-safetensors")
            )
        if not (folder / "config.json").is_file() and not (folder / "mllm_config.json").is_file():
            raise CheckpointError(f"{where} holds no model: neither config.json nor mllm_config.json is there")
    return folder


def _remote_files(repo_id: str, revision: str | None) -> list[str]:
    from huggingface_hub import list_repo_files

    try:
        return list_repo_files(repo_id, revision=revision)
    except Exception:  # noqa: BLE001 - only used to explain a missing safetensors file
        return []


def require_safetensors(directory: str | Path) -> None:
    """Refuse a local transformers model directory whose weights are only pickles, naming the command that
    re-saves it as safetensors (a hub id or a directory with no weights at all passes: transformers, told
    `use_safetensors=True`, names what is missing)."""
    folder = Path(directory)
    if folder.is_dir() and (pickled := _pickled_only(_top_level_files(folder))):
        raise _pickle_error(str(folder), pickled, _resave_command(folder, str(folder), f"{folder}-safetensors"))


def require_safetensors_adapter(directory: str | Path) -> None:
    """A peft LoRA adapter directory must hold adapter_model.safetensors: given it, peft reads nothing else
    (it would fall back to unpickling adapter_model.bin)."""
    folder = Path(directory)
    if (folder / "adapter_model.safetensors").is_file():
        return
    if pickled := _pickled_only(_top_level_files(folder)):
        command = (
            'python -c "from peft.utils import load_peft_weights; from safetensors.torch import save_file; '
            f"save_file(load_peft_weights('{folder}'), '{folder / 'adapter_model.safetensors'}')\""
        )
        raise _pickle_error(str(folder), pickled, command)
    raise CheckpointError(
        f"{folder} has no adapter_model.safetensors; save the LoRA adapter again with save_pretrained"
    )


def _top_level_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []


def _pickled_only(files: list[str]) -> str | None:
    """The first pickled weight file of `files` when none of them is safetensors, else None."""
    if any(f.endswith(".safetensors") for f in files):
        return None
    return next((f for f in sorted(files) if any(fnmatch.fnmatch(f, p) for p in PICKLED)), None)


def _resave_command(folder: Path, source: str, out: str) -> str:
    """The one-line re-save of `source` as safetensors in `out`, with the class its config.json names (the
    head would be lost through AutoModel), else AutoModel."""
    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        architectures = []
    cls = architectures[0] if architectures and str(architectures[0]).isidentifier() else "AutoModel"
    return (
        f'python -c "from transformers import {cls}; '
        f"{cls}.from_pretrained('{source}').save_pretrained('{out}')\", then load {out}"
    )


def _pickle_error(where: str, pickled: str, command: str) -> CheckpointError:
    return CheckpointError(
        f"{where} has its weights only as pickle files ({pickled}), which mllm never loads (unpickling can run "
        f"code); convert them once to safetensors: {command}"
    )
