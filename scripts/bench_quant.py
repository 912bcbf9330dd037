"""Quantization benchmark: the same model loaded in full precision, 8-bit and 4-bit (bitsandbytes), one process.

For each: the LLM's weight bytes, the process's RSS once loaded and its peak (loading reads the
full-precision safetensors through a file mapping first), load time, prefill ms, decode tokens/s
(64 forced tokens) and accuracy on the 50 fixed shapes-world test questions CI uses (the quality the
memory saving costs). Ratios are against the full-precision load. Each load runs in a fresh child
process, so its peak RSS is its own (freed memory of an earlier load would otherwise be reused). The
vision tower and connector are never quantized, so their bytes are the same in every row.

    .venv/bin/python scripts/bench_quant.py [--model default] [--device cpu] [--questions 50]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from bench_infer import bench_mllm  # scripts/ is on sys.path when a script runs
from PIL import Image
from transformers.utils import logging as hf_logging

from mllm.generation import image_features
from mllm.loading import load_model

QUANTIZATIONS = ("none", "8bit", "4bit", "int4")


def rss_bytes() -> int:
    """Resident memory now (the weights' file mappings are closed once loading ends)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (4-bit weights are packed uint8 tensors: their real size)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}  # tied weights once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def speed(model, input_ids, features, n_tokens: int, repeats: int) -> tuple[float, float]:
    """(prefill ms, decode tokens/s), medians over `repeats`, timed exactly as bench_infer times mllm."""
    bench_mllm(model, input_ids, features, 4)  # warm-up
    runs = [bench_mllm(model, input_ids, features, n_tokens) for _ in range(repeats)]
    return statistics.median(r[0] for r in runs) * 1e3, statistics.median(r[1] for r in runs)


def measure(args) -> dict:
    """One load, in this process: the figures of `args.only`."""
    hf_logging.disable_progress_bar()
    from training.evaluate import evaluate
    from training.formats import read_rows
    from training.synth import write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_dataset(tmp, n=400, seed=0)  # the same 50 questions as tests/test_demo_model.py
        test_rows = read_rows(paths["test_qa"], paths["images"])
        rows = test_rows[: args.questions]
        image = Image.open(test_rows[0].images[0]).convert("RGB")  # the speed prompt: the first test image
        t0 = time.perf_counter()
        model = load_model(args.model, device=args.device, quantization=args.only)
        load_s = time.perf_counter() - t0
        gc.collect()
        rss_loaded = rss_bytes()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
        encoded = model.processor.encode(messages, [image], add_generation_prompt=True)
        features = image_features(model, encoded)
        prefill_ms, tok_s = speed(model, encoded.input_ids, features, args.tokens, args.repeats)
        accuracy = evaluate(model, rows, progress=False)[0]["accuracy"] if rows else None
    return {
        "quantization": args.only,
        "llm_bytes": weight_bytes(model.llm),
        "rss_bytes": rss_loaded,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        "load_s": load_s,
        "prefill_ms": prefill_ms,
        "decode_tok_s": tok_s,
        "accuracy": accuracy,
        "questions": len(rows),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--questions", type=int, default=50, help="fixed shapes-world test questions scored (0: skip)")
    p.add_argument("--only", choices=QUANTIZATIONS, help=argparse.SUPPRESS)  # the child process's one load
    args = p.parse_args(argv)
    if args.only:
        print(json.dumps(measure(args)))
        return 0
    results = []
    for quantization in QUANTIZATIONS:
        child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--only", quantization]
        out = subprocess.run(child, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = results[0]
    print(f"model {args.model!r} on {args.device}, {args.tokens} new tokens, median of {args.repeats}; accuracy on")
    print(f"{base['questions']} fixed test questions; each load in its own process")
    print(
        "| LLM weights | LLM MiB | smaller by | RSS after load (MiB) | peak RSS (MiB) | load s | prefill ms "
        "| decode tok/s | vs none | accuracy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        accuracy = "-" if r["accuracy"] is None else f"{r['accuracy']:.0%}"
        print(
            f"| {r['quantization']} | {r['llm_bytes'] / 2**20:.0f} | {base['llm_bytes'] / r['llm_bytes']:.2f}x "
            f"| {r['rss_bytes'] / 2**20:.0f} | {r['peak_rss_bytes'] / 2**20:.0f} | {r['load_s']:.1f} | {r['prefill_ms']:.0f} "
            f"| {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base['decode_tok_s']:.2f}x | {accuracy} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
