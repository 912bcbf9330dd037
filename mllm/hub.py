"""Models by hub name: `org/name` (or `org/name@revision`) becomes a local directory, safely.

`local_path(name)` leaves an existing path alone and downloads a hub repository through `huggingface_hub`
(`snapshot_download`, its progress bar, its cache, `HF_HUB_OFFLINE=1` honoured): only the files a model
needs (safetensors weights, JSON configs, tokenizer and processor files, chat templates), never pickled
`.bin` / `.pt` weights and never code, so nothing in a repository can run here. What it returns is then
recognised by its config like any directory (an mllm checkpoint, a llava-hf / BLIP-2 / InstructBLIP one,
or a plain LLM / vision tower), never by its name.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

from mllm.errors import CheckpointError

# What a model directory needs; everything else (pickles, code, images, ONNX / GGUF exports) stays remote.
ALLOWED = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.model",  # sentencepiece
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
    "adapter/*",  # an mllm checkpoint's LoRA adapter (its own safetensors + JSON)
)
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_id(name: str) -> bool:
    """`org/name` or `org/name@revision` that is not a path on this machine."""
    return bool(HUB_ID.match(name)) and not Path(name).exists() and not name.startswith((".", "/", "~"))


def local_path(name: str) -> str:
    """`name` itself if it is not a hub id; else the local snapshot of that repository (downloaded if needed)."""
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
        pickled = [f for f in files + remote if any(fnmatch.fnmatch(f, p) for p in PICKLED)]
        if pickled:
            raise CheckpointError(
                f"{where} has its weights only as pickle files ({pickled[0]}), which mllm never loads (they can run "
                "code); convert them to safetensors with transformers (`Model.from_pretrained(dir)"
                ".save_pretrained(out, safe_serialization=True)`) and load that directory"
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
