"""API load benchmark: N concurrent conversations, each with its own shapes-world image, over real HTTP.

Starts the OpenAI-compatible server in-process on loopback, streams every answer with the
`openai` client, and prints p50 / p95 latency, time to first token (TTFT), per-stream decode
tokens/s and the aggregate tokens/s; then checks the server still answers. Bounded: at most 64
conversations, 512 tokens each, and a wall-clock limit.

    .venv/bin/python scripts/bench_api.py [--model default] [--n 16] [--max-tokens 32] [--max-concurrency 4]
        [--long-prompt 7000]
"""

from __future__ import annotations

import argparse
import base64
import io
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import openai
from transformers.utils import logging as hf_logging

from app.api import create_app, serving
from app.engine import ChatEngine
from mllm.generation import GenerationConfig
from training.synth_scene import make_scene, render


def data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with 16 samples p95 is the 16th)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def one_conversation(client: openai.OpenAI, model: str, image_url: str, max_tokens: int) -> dict:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": "Describe the image."},
            ],
        }
    ]
    start = time.perf_counter()
    first = None
    usage = None
    chunks = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
    )
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        usage = chunk.usage or usage
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage else 0
    first = first or end
    decode_s = end - first
    return {
        "latency": end - start,
        "ttft": first - start,
        "tokens": tokens,
        "tok_s": (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else float("nan"),
    }


def long_prefill_gaps(engine: ChatEngine, prompt_tokens: int) -> dict:
    """While one request's `prompt_tokens`-token prompt is prefilled, how often does a running stream still
    produce tokens? In-process on the server's engine (a reply of fixed length needs `ignore_eos`)."""
    running = engine.complete([{"role": "user", "content": "hello"}], GenerationConfig(4000, ignore_eos=True))
    next(running)
    filler = "the circle is red and the square is blue "
    per = len(engine.model.processor.encode([{"role": "user", "content": filler * 100}], [], True).input_ids) / 100
    long_request = engine.complete(
        [{"role": "user", "content": filler * int(prompt_tokens / per)}], GenerationConfig(1)
    )
    done = []
    worker = threading.Thread(target=lambda: done.append(next(long_request, "")))
    stamps = [time.perf_counter()]
    worker.start()
    while worker.is_alive():
        next(running)
        stamps.append(time.perf_counter())
    worker.join()
    running.close()
    long_request.close()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])] or [float("nan")]
    return {
        "prompt": long_request.prompt_tokens,
        "prefill_s": stamps[-1] - stamps[0],
        "tokens": len(gaps),
        "max_gap": max(gaps),
        "p50_gap": percentile(gaps, 50),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="auto")
    p.add_argument("--n", type=int, default=16, help="concurrent conversations (1..64)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (1..512)")
    p.add_argument("--max-concurrency", type=int, default=4, help="replies the engine generates at once")
    p.add_argument("--timeout", type=float, default=600, help="wall-clock limit for the whole run, seconds")
    p.add_argument(
        "--long-prompt", type=int, default=0, help="also: a stream's token gaps while a prompt this long prefills"
    )
    args = p.parse_args(argv)
    if not (1 <= args.n <= 64 and 1 <= args.max_tokens <= 512):
        p.error("need 1 <= --n <= 64 and 1 <= --max-tokens <= 512")
    hf_logging.disable_progress_bar()

    t0 = time.perf_counter()
    engine = ChatEngine.load(args.model, device=args.device, max_concurrency=args.max_concurrency, max_queue=args.n)
    print(f"model {args.model!r} loaded in {time.perf_counter() - t0:.1f} s on {engine.info()['device']}")
    images = [data_uri(render(make_scene(random.Random(1000 + i)))) for i in range(args.n)]

    with serving(create_app(engine)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=args.timeout)
        one_conversation(client, engine.model_id, images[0], 4)  # warm-up: first-call allocations are not load
        wall = time.perf_counter()
        with ThreadPoolExecutor(args.n) as pool:
            futures = [pool.submit(one_conversation, client, engine.model_id, im, args.max_tokens) for im in images]
            done, pending = wait(futures, timeout=args.timeout)
            for future in pending:
                future.cancel()
        wall = time.perf_counter() - wall
        if pending:
            print(f"FAILED: {len(pending)} of {args.n} conversations did not finish within {args.timeout:.0f} s")
            return 1
        results = [f.result() for f in futures]
        alive = client.models.list().data[0].id == engine.model_id
        alive = alive and client.chat.completions.create(
            model=engine.model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )

    tokens = sum(r["tokens"] for r in results)
    rows = [
        ("latency", [r["latency"] for r in results], "s"),
        ("time to first token", [r["ttft"] for r in results], "s"),
        ("decode tokens/s per stream", [r["tok_s"] for r in results if r["tok_s"] == r["tok_s"]], ""),
    ]
    print(f"\n{args.n} concurrent conversations, max_tokens={args.max_tokens}, max_concurrency={args.max_concurrency}")
    print("| metric | p50 | p95 |\n|---|---|---|")
    for name, values, unit in rows:
        if values:
            print(f"| {name} | {percentile(values, 50):.2f}{unit} | {percentile(values, 95):.2f}{unit} |")
    print(f"\naggregate: {tokens} tokens in {wall:.1f} s = {tokens / wall:.1f} tokens/s")
    print(f"server alive afterwards: {'yes' if alive else 'NO'}")
    if args.long_prompt:
        gaps = long_prefill_gaps(engine, args.long_prompt)
        print(
            f"\nwhile a {gaps['prompt']}-token prompt was prefilled ({gaps['prefill_s']:.1f} s), a running stream "
            f"produced {gaps['tokens']} tokens: inter-token gap p50 {gaps['p50_gap']:.2f} s, max {gaps['max_gap']:.2f} s"
        )
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
