"""`load_model(name)`: the one entry that turns a name into a model, whatever the name points at.

- `default`: the built-in demo model (`mllm/assets/demo`, the `mlp2x_gelu` connector); `default-qformer`: the
  same world through BLIP-2's Q-Former (`mllm/assets/demo-qformer`);
- an mllm checkpoint directory (it has `mllm_config.json`): `mllm.checkpoint`;
- a transformers LLaVA / BLIP-2 / InstructBLIP directory, recognised by its `config.json`, never by its
  name: `mllm.interop`.
`load_processor(name)` gives the same model's processor alone (tokenizer, template, image settings),
without loading any weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mllm.assembly import build_model, pick_device
from mllm.atomic import recover
from mllm.backends import choose as choose_backend
from mllm.checkpoint import load_pretrained, with_quantization
from mllm.config import CONFIG_FILE, MLLMConfig
from mllm.errors import CheckpointError
from mllm.hf_checkpoints import detect_format, read_hf_config
from mllm.hub import local_path
from mllm.interop.importer import load_transformers
from mllm.model import MLLM
from mllm.processor import Processor

DEMO_DIR = Path(__file__).parent / "assets" / "demo"
BUILTIN = {"default": DEMO_DIR, "default-qformer": DEMO_DIR.parent / "demo-qformer"}  # name -> its directory
# What a CPU load gets unless told otherwise: `scripts/bench_infer.py` measured int4 at 2.4x float32's
# decode speed with the same accuracy (99.1% on the demo's first 700 held-out questions, both).
CPU_DEFAULT_QUANTIZATION = "int4"


def load_model(
    name: str = "default", device: str | None = None, quantization: str | None = None, backend: str = "auto"
) -> MLLM:
    """`default` (the built-in demo model), an mllm checkpoint directory, or a transformers LLaVA / BLIP-2 /
    InstructBLIP directory, or any of these by hub id (`org/name`, `org/name@revision`: `mllm.hub`); a path that
    does not exist is a CheckpointError.

    `backend` (`mllm.backends`): `llamacpp` runs the LLM in llama.cpp, and `quantization` then names its GGUF
    type (q4_0, q4_1, q8_0, f16, f32); `int4` / `transformers` keep it in torch, `quantization` (none | 8bit |
    4bit | int4) overriding the stored setting. `auto`: on a CPU, `mllm.backends.CPU_DEFAULT` where it is
    installed and a torch quantization was not asked for, else int4; on CUDA the stored setting through
    transformers."""
    name = resolve_name(name)
    options = choose_backend(backend, quantization, pick_device(device).type, CPU_DEFAULT_QUANTIZATION)
    quantization = options.pop("quantization")
    if name in BUILTIN:
        if (BUILTIN[name] / CONFIG_FILE).is_file():
            return load_pretrained(BUILTIN[name], device=device, quantization=quantization, **options)
        if name != "default":
            raise CheckpointError(
                f"the built-in model {name!r} is not in this install ({BUILTIN[name]} has no {CONFIG_FILE}); "
                "scripts/train_demo.sh trains it (SHIP=1 copies it there)"
            )
        # No trained demo weights in this install: the default architecture with a seeded, untrained connector.
        torch.manual_seed(0)
        config = MLLMConfig() if quantization is None else with_quantization(MLLMConfig(), quantization)
        return build_model(config, device=device, trainable=False, **options)
    path = Path(name)
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        if detect_format(path) is not None:
            return load_transformers(path, device=device, quantization=quantization, **options)
        if (hf_config := read_hf_config(path)) is not None:
            raise CheckpointError(
                f"{path} is a transformers {hf_config.get('model_type', 'model')!r} checkpoint; mllm loads "
                "llava, blip-2 and instructblip ones (or mllm checkpoints, which have mllm_config.json)"
            )
    return load_pretrained(name, device=device, quantization=quantization, **options)


def load_processor(name: str = "default") -> Processor:
    """The processor of `load_model(name)`'s model on its own (mllm checkpoints and `default`: no weights are
    read; a transformers directory's processor is the one its import makes)."""
    directory = BUILTIN[name] if name in BUILTIN else Path(resolve_name(name))
    if (directory / CONFIG_FILE).is_file():
        return Processor.from_pretrained(directory)
    return load_model(name, device="cpu", quantization="none").processor


def resolve_name(name: str) -> str:
    """A built-in name as it is; a hub id (`org/name[@revision]`) as its downloaded snapshot; a local directory
    as its path, put back first if a kill mid-save left it aside (`mllm.atomic.recover`). Anything else is a
    missing directory, said so here rather than tried as a hub id or read as an empty checkpoint."""
    if name in BUILTIN:
        return name
    name = local_path(name)  # a hub id becomes its snapshot; a NUL byte is refused
    directory = Path(name).expanduser()
    recover(directory)
    if not directory.exists():
        raise CheckpointError(f"{name}: no such directory; check the path (hub ids are org/name)")
    return str(directory)
