"""Load a released LLaVA / BLIP-2 / InstructBLIP checkpoint directly, or convert it to an mllm checkpoint.

`load_transformers(path)` assembles the model in memory: tower and LLM are read from the source directory
by path, so nothing is copied and 4-/8-bit loading works as for any LLM. `convert(src, out)` writes an mllm
checkpoint that carries its base weights: `vision/` and `llm/` (save_pretrained, in the source's dtype),
referenced from `mllm_config.json` by paths relative to the checkpoint (`./vision`, `./llm`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import AutoConfig, AutoImageProcessor

from mllm.assembly import assemble
from mllm.atomic import atomic_directory
from mllm.checkpoint import save_pretrained, with_quantization
from mllm.errors import CheckpointError
from mllm.hf_checkpoints import detect_format, forget_key_mapping, quiet_loading, replaceable_output, saved_dtype
from mllm.interop.blip2 import plan_blip2
from mllm.interop.llava import plan_llava
from mllm.interop.plan import ImportPlan
from mllm.model import MLLM

PLANNERS = {"llava": plan_llava, "blip2": plan_blip2, "instructblip": plan_blip2}


def plan_import(path: str | Path, template: str | None = None, expect: str | None = None) -> ImportPlan:
    """Read a transformers checkpoint directory into an import plan; `expect` checks its format."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; give a local transformers checkpoint directory")
    fmt = detect_format(path)
    if fmt is None:
        raise CheckpointError(
            f"{path} is not a LLaVA / BLIP-2 / InstructBLIP transformers checkpoint (its config.json model_type "
            "must be llava, blip-2 or instructblip)"
        )
    if expect is not None and expect != fmt:
        raise CheckpointError(f"{path} is a {fmt} checkpoint, not {expect}; use --from {fmt}")
    hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    return PLANNERS[fmt](path, hf_config, template)


def assemble_plan(plan: ImportPlan, device=None, llm_dtype: torch.dtype | None = None, **backend) -> MLLM:
    """The MLLM an import plan describes; `llm_dtype` keeps the LLM in a given dtype (conversion); `backend`,
    `gguf_type`: what decodes (`mllm.assembly.assemble`)."""
    return assemble(
        plan.config,
        plan.tokenizer,
        plan.template,
        device,
        qformer_tokenizer=plan.qformer_tokenizer,
        connector_state=plan.connector_state,
        llm_dtype=llm_dtype,
        **backend,
    )


def load_transformers(
    path: str | Path,
    device: str | None = None,
    quantization: str | None = None,
    template: str | None = None,
    **backend,
) -> MLLM:
    """An MLLM straight from a LLaVA / BLIP-2 / InstructBLIP transformers directory (recognised by its config)."""
    plan = plan_import(path, template)
    if quantization is not None:
        plan.config = with_quantization(plan.config, quantization)
    return assemble_plan(plan, device, **backend)


def convert(src: str | Path, out: str | Path, source: str | None = None, template: str | None = None) -> Path:
    """Write `src` (a transformers checkpoint of format `source`) as a self-contained mllm checkpoint at `out`."""
    plan = plan_import(src, template, expect=source)
    dtype = saved_dtype(plan.hf_config)
    model = assemble_plan(plan, device="cpu", llm_dtype=dtype)
    # The base weights come along, referenced relative to the checkpoint so the folder can move.
    model.config = model.config.replace(
        vision=dataclasses.replace(model.config.vision, path="./vision"),
        llm=dataclasses.replace(model.config.llm, path="./llm"),
    )
    out = Path(out).expanduser().resolve()
    if out == plan.path:
        raise CheckpointError(f"the output {out} is the source checkpoint; write the mllm checkpoint elsewhere")
    with atomic_directory(out, may_replace=replaceable_output) as ckpt:
        save_pretrained(model, ckpt)  # the processor writes InstructBLIP's qformer_tokenizer/ too
        with quiet_loading():
            forget_key_mapping(model.vision.model.to(dtype)).save_pretrained(ckpt / "vision", safe_serialization=True)
            AutoImageProcessor.from_pretrained(str(plan.path)).save_pretrained(ckpt / "vision")
            forget_key_mapping(model.llm).save_pretrained(ckpt / "llm", safe_serialization=True)
            plan.tokenizer.save_pretrained(ckpt / "llm")
    return out
