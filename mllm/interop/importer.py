"""Load a released LLaVA / BLIP-2 / InstructBLIP checkpoint directly, or convert it to an mllm checkpoint.

`load_transformers(path)` assembles the model in memory: tower and LLM are read from the source directory
by path, so nothing is copied and 4-/8-bit loading works as for any LLM. `convert(src, out)` writes an mllm
checkpoint that carries its base weights: `vision/` and `llm/` (save_pretrained, in the source's dtype),
referenced from `mllm_config.json` by paths relative to the checkpoint (`./vision`, `./llm`).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

from transformers import AutoConfig, AutoImageProcessor

from mllm.checkpoint import save_pretrained
from mllm.interop.blip2 import plan_blip2
from mllm.interop.common import detect_format, forget_key_mapping, quiet_transformers, replace_dir, source_dtype
from mllm.interop.llava import plan_llava
from mllm.interop.plan import ImportPlan, assemble
from mllm.model import MLLM

PLANNERS = {"llava": plan_llava, "blip2": plan_blip2, "instructblip": plan_blip2}


def plan_import(path: str | Path, template: str | None = None, expect: str | None = None) -> ImportPlan:
    """Read a transformers checkpoint directory into an import plan; `expect` checks its format."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; give a local transformers checkpoint directory")
    fmt = detect_format(path)
    if fmt is None:
        raise ValueError(
            f"{path} is not a LLaVA / BLIP-2 / InstructBLIP transformers checkpoint (its config.json model_type "
            "must be llava, blip-2 or instructblip)"
        )
    if expect is not None and expect != fmt:
        raise ValueError(f"{path} is a {fmt} checkpoint, not {expect}; use --from {fmt}")
    hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    return PLANNERS[fmt](path, hf_config, template)


def load_transformers(
    path: str | Path, device: str | None = None, quantization: str | None = None, template: str | None = None
) -> MLLM:
    """An MLLM straight from a LLaVA / BLIP-2 / InstructBLIP transformers directory (recognised by its config)."""
    plan = plan_import(path, template)
    if quantization is not None:
        llm = dataclasses.replace(plan.config.llm, quantization=quantization)
        plan.config = plan.config.replace(llm=llm)
    return assemble(plan, device)


def convert(src: str | Path, out: str | Path, source: str | None = None, template: str | None = None) -> Path:
    """Write `src` (a transformers checkpoint of format `source`) as a self-contained mllm checkpoint at `out`."""
    plan = plan_import(src, template, expect=source)
    dtype = source_dtype(plan.hf_config)
    model = assemble(plan, device="cpu", llm_dtype=dtype)
    # The base weights come along, referenced relative to the checkpoint so the folder can move.
    model.config = model.config.replace(
        vision=dataclasses.replace(model.config.vision, path="./vision"),
        llm=dataclasses.replace(model.config.llm, path="./llm"),
    )
    out = Path(out).expanduser().resolve()
    if out == plan.path:
        raise ValueError(f"the output {out} is the source checkpoint; write the mllm checkpoint elsewhere")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.convert-"))
    try:
        ckpt = staging / "ckpt"
        save_pretrained(model, ckpt)  # the processor writes InstructBLIP's qformer_tokenizer/ too
        with quiet_transformers():
            forget_key_mapping(model.vision.model.to(dtype)).save_pretrained(ckpt / "vision", safe_serialization=True)
            AutoImageProcessor.from_pretrained(str(plan.path)).save_pretrained(ckpt / "vision")
            forget_key_mapping(model.llm).save_pretrained(ckpt / "llm", safe_serialization=True)
            plan.tokenizer.save_pretrained(ckpt / "llm")
        replace_dir(ckpt, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
