"""The GGUF export's check on a real LLM, at each type: the figures in the README's "Export to Ollama / llama.cpp".

The model: a random tiny SigLIP tower (no CLIP / SigLIP weights install offline) + an `mlp2x_gelu` connector + the
real SmolLM2-135M-Instruct with a LoRA adapter, connector and adapter trained a few steps to answer the check's
questions with a fixed sentence (so the adapter decides the answers, and an export that lost it would show).
Each `--types` entry is one export with its check; `auto` lets the check pick the type.

    .venv/bin/python scripts/bench_gguf_export.py --out runs/bench-gguf --types f16 q8_0 q4_0 auto
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mllm.assembly import build_model
from mllm.checkpoint import save_pretrained
from mllm.config import ConnectorConfig, LLMConfig, LoraConfig, MLLMConfig, VisionConfig
from mllm.gguf_check import QUESTIONS, check_images
from mllm.gguf_export import export_gguf
from mllm.tiny import build_siglip

ANSWER = "There is one red circle in the middle of the picture."


def trained_checkpoint(out: Path, steps: int) -> Path:
    tower = build_siglip(out / "siglip", image_size=64, patch_size=8)
    config = MLLMConfig(
        vision=VisionConfig(kind="hf", path=str(tower)),
        connector=ConnectorConfig(kind="mlp2x_gelu"),
        llm=LLMConfig(lora=LoraConfig(r=8, alpha=16, dropout=0.0)),
        template="auto",
        tune={"vision": "frozen", "connector": "full", "llm": "lora"},
    )
    torch.manual_seed(0)
    model = build_model(config, device="cpu")
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("connector.") or "lora_" in name
    processor = model.processor
    rows = [
        processor.encode(
            [{"role": "user", "content": f"{processor.image_token}\n{q}"}, {"role": "assistant", "content": ANSWER}],
            images=[image],
        )
        for image, q in zip(check_images(), QUESTIONS)
    ]
    batch = processor.collate(rows)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(steps):
        _, loss = model(**batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.3f}", flush=True)
    save_pretrained(model.eval(), out / "ckpt")
    return out / "ckpt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench-gguf"))
    p.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_0", "auto"])
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    torch.set_num_threads(2)
    ckpt = args.out / "ckpt" if (args.out / "ckpt").is_dir() else trained_checkpoint(args.out, args.steps)
    for kind in args.types:
        start = time.perf_counter()
        result = export_gguf(str(ckpt), args.out / f"export-{kind}", llm_type=None if kind == "auto" else kind)
        print(f"--types {kind} ({time.perf_counter() - start:.0f} s): {result.llm.name}")
        print(result.summary(), flush=True)


if __name__ == "__main__":
    main()
