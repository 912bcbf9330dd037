"""API load benchmark: N concurrent conversations, each with its own shapes-world image, over real HTTP.

Starts the OpenAI-compatible server in-process on loopback and streams every answer with the `openai`
client, run in a separate process as real clients are (in the server's process, 16 client threads parsing
every token's chunk took the GIL from the server: 16 x 128 tokens measured 247 tok/s there, 299 from a
process of their own). For each concurrency level: the aggregate tokens/s (and its ratio to one stream),
the mean batch the engine decoded, p50 / p95 latency and time to first token (TTFT); then a multi-turn
scenario (one client, 5 turns, the history re-sent each time) against the same model served with the prefix
cache off.
Bounded: at most 64 conversations, 512 tokens each, and a wall-clock limit.

    .venv/bin/python scripts/bench_api.py [--model default] [--levels 1,4,16] [--max-tokens 32]
        [--max-concurrency 16] [--turns 5] [--long-prompt 7000] [--ignore-eos] [--quantization none] [--backend llamacpp]
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import multiprocessing
import random
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, wait

import openai
from transformers.utils import logging as hf_logging

from app.api import create_app, serving
from app.engine import ChatEngine
from mllm.cpu_features import describe
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


@functools.cache
def api_client(url: str, timeout: float) -> openai.OpenAI:
    """One `openai` client per server in the client process (it keeps its connections)."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout)


def one_conversation(
    client: openai.OpenAI, model: str, image_url: str, max_tokens: int, ignore_eos: bool = False
) -> dict:
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
        extra_body={"ignore_eos": True} if ignore_eos else None,
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


def concurrent(
    url: str, model_id: str, images: list[str], max_tokens: int, timeout: float, ignore_eos: bool = False
) -> dict | None:
    """len(images) conversations at once against the server at `url`, one image each: latency / TTFT
    percentiles and aggregate tokens/s. Runs in the client process."""
    client = api_client(url, timeout)
    wall = time.perf_counter()
    with ThreadPoolExecutor(len(images)) as pool:
        futures = [pool.submit(one_conversation, client, model_id, im, max_tokens, ignore_eos) for im in images]
        done, pending = wait(futures, timeout=timeout)
        for future in pending:
            future.cancel()
    wall = time.perf_counter() - wall
    if pending:
        return None
    results = [f.result() for f in futures]
    tokens = sum(r["tokens"] for r in results)
    return {
        "n": len(images),
        "tokens": tokens,
        "wall_s": wall,
        "aggregate": tokens / wall,
        "latency": [r["latency"] for r in results],
        "ttft": [r["ttft"] for r in results],
    }


def median_run(repeats: list[dict]) -> dict:
    """One row from repeated runs of a level: each rate its median; latencies from the median-aggregate run."""
    middle = sorted(repeats, key=lambda r: r["aggregate"])[len(repeats) // 2]
    row = dict(middle)
    for key in ("engine", "decode", "mean_batch", "pack"):
        row[key] = sorted(r[key] for r in repeats)[len(repeats) // 2]
    return row


def in_process(engine: ChatEngine, scenes: list, max_tokens: int, ignore_eos: bool = False) -> float:
    """The same conversations on the engine directly (no HTTP, no client in this process): aggregate tokens/s."""
    gen = GenerationConfig(max_new_tokens=max_tokens, ignore_eos=ignore_eos)
    streams = [
        engine.complete(
            [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": im}, {"type": "text", "text": "Describe the image."}],
                }
            ],
            gen=gen,
        )
        for im in scenes
    ]
    wall = time.perf_counter()
    threads = [threading.Thread(target=lambda s=s: "".join(s)) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(s.completion_tokens for s in streams) / (time.perf_counter() - wall)


def multi_turn(
    url: str, model_id: str, image_url: str, turns: int, max_tokens: int, timeout: float
) -> tuple[list[float], list[str]]:
    """One client, `turns` turns through the stateless API, the whole history re-sent each time (as every chat
    front end does): each turn's time to first token, and the answers. Runs in the client process."""
    client = api_client(url, timeout)
    questions = [
        "Describe the image.",
        "What colour is the circle?",
        "How many objects are there?",
        "Is there a square?",
        "Where is the triangle?",
        "What shapes do you see?",
    ]
    messages, ttfts, answers = [], [], []
    for k in range(turns):
        content = [{"type": "text", "text": questions[k % len(questions)]}]
        if k == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
        messages.append({"role": "user", "content": content})
        start, first, text = time.perf_counter(), None, ""
        for chunk in client.chat.completions.create(
            model=model_id, messages=messages, max_tokens=max_tokens, stream=True, temperature=0
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
        ttfts.append((first or time.perf_counter()) - start)
        answers.append(text)
        messages.append({"role": "assistant", "content": text})
    return ttfts, answers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--quantization", default=None, help="int4 | none | 4bit | 8bit (default: the model's own, int4 on CPU)"
    )
    p.add_argument("--backend", default="auto", help="llamacpp | int4 | transformers (default: the CPU default)")
    p.add_argument("--levels", default="1,4,16", help="concurrent conversations to measure, a comma list (1..64)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (1..512)")
    p.add_argument("--max-concurrency", type=int, default=16, help="replies the engine generates (batches) at once")
    p.add_argument("--turns", type=int, default=5, help="multi-turn scenario: turns per client (0: skip)")
    p.add_argument("--timeout", type=float, default=600, help="wall-clock limit for each level, seconds")
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per level; the table gives each figure's median (a 2-core host is noisy)",
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="every answer runs to --max-tokens (vLLM's ignore_eos): decode-bound load at a fixed length",
    )
    p.add_argument(
        "--long-prompt", type=int, default=0, help="also: a stream's token gaps while a prompt this long prefills"
    )
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    if not levels or not all(1 <= n <= 64 for n in levels) or not 1 <= args.max_tokens <= 512:
        p.error("need --levels within 1..64 and 1 <= --max-tokens <= 512")
    hf_logging.disable_progress_bar()
    print(describe())

    t0 = time.perf_counter()
    engine = ChatEngine.load(
        args.model,
        device=args.device,
        quantization=args.quantization,
        backend=args.backend,
        max_concurrency=args.max_concurrency,
        max_queue=max(levels),
    )
    info = engine.info()
    print(
        f"model {args.model!r} ({info['backend']}, {info['quantization']}) loaded in {time.perf_counter() - t0:.1f} s on {info['device']}"
    )
    scenes = [render(make_scene(random.Random(1000 + i))) for i in range(max(levels))]
    images = [data_uri(scene) for scene in scenes]

    runs = []
    # The clients' process (spawned: no copy of this one's model or threads); `remote(fn, ...)` runs fn there.
    clients = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def remote(fn, *args_):
        return clients.submit(fn, *args_).result()

    with serving(create_app(engine)) as url:
        remote(concurrent, url, engine.model_id, images[:1], 4, args.timeout)  # warm-up: first-call allocations
        cache = engine.prefix_cache
        for n in levels:
            repeats = []
            for _ in range(max(1, args.repeat)):
                # Every run prefills from scratch: no prefix or image feature is left from the run before.
                engine.prefix_cache, engine.feature_cache = None, type(engine.feature_cache)()
                steps, batched, decode_s = engine.batcher.steps, engine.batcher.batched_tokens, engine.batcher.decode_s
                forwards, chunks = engine.batcher.prefill_forwards, engine.batcher.prefilled_chunks
                run = remote(
                    concurrent, url, engine.model_id, images[:n], args.max_tokens, args.timeout, args.ignore_eos
                )
                if run is None:
                    print(f"FAILED: {n} conversations did not finish within {args.timeout:.0f} s")
                    return 1
                run["mean_batch"] = (engine.batcher.batched_tokens - batched) / max(engine.batcher.steps - steps, 1)
                # Tokens per second of decode steps alone: what batching decides (prefill and encodes excluded).
                run["decode"] = (engine.batcher.batched_tokens - batched) / max(
                    engine.batcher.decode_s - decode_s, 1e-9
                )
                # Prompt chunks per packed prefill forward (`mllm.batching.PACK_ROWS`).
                run["pack"] = (engine.batcher.prefilled_chunks - chunks) / max(
                    engine.batcher.prefill_forwards - forwards, 1
                )
                engine.feature_cache = type(engine.feature_cache)()
                run["engine"] = in_process(engine, [s.copy() for s in scenes[:n]], args.max_tokens, args.ignore_eos)
                repeats.append(run)
            runs.append(median_run(repeats))
        engine.prefix_cache = cache
        alive = api_client(url, args.timeout).chat.completions.create(
            model=engine.model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        if args.turns:
            cached_ttft, cached_answers = remote(
                multi_turn, url, engine.model_id, images[0], args.turns, args.max_tokens, args.timeout
            )

    single = next((r["aggregate"] for r in runs if r["n"] == 1), None)
    single_engine = next((r["engine"] for r in runs if r["n"] == 1), None)
    single_decode = next((r["decode"] for r in runs if r["n"] == 1), None)
    fixed = ", ignore_eos" if args.ignore_eos else ""
    print(
        f"\nmax_tokens={args.max_tokens}{fixed}, greedy, max_concurrency={args.max_concurrency}, over HTTP (openai client, own process)"
    )
    print(
        "| conversations | aggregate tok/s (HTTP) | vs 1 stream | engine in-process tok/s | vs 1 stream "
        "| decode steps tok/s | vs 1 stream | mean batch | prompts per prefill | latency p50 / p95 (s) "
        "| TTFT p50 / p95 (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        ratio = f"{r['aggregate'] / single:.2f}x" if single else ""
        engine_ratio = f"{r['engine'] / single_engine:.2f}x" if single_engine else ""
        decode_ratio = f"{r['decode'] / single_decode:.2f}x" if single_decode else ""
        print(
            f"| {r['n']} | {r['aggregate']:.1f} | {ratio} | {r['engine']:.1f} | {engine_ratio} "
            f"| {r['decode']:.1f} | {decode_ratio} | {r['mean_batch']:.1f} | {r['pack']:.1f} "
            f"| {percentile(r['latency'], 50):.2f} / {percentile(r['latency'], 95):.2f} "
            f"| {percentile(r['ttft'], 50):.2f} / {percentile(r['ttft'], 95):.2f} |"
        )
    print(f"server alive afterwards: {'yes' if alive else 'NO'}")
    if args.turns:
        # The same scenario against the same model served with the prefix cache off.
        plain = ChatEngine(engine.model, name=engine.name, max_concurrency=args.max_concurrency, prefix_cache_mib=0)
        with serving(create_app(plain)) as url:
            plain_ttft, plain_answers = remote(
                multi_turn, url, plain.model_id, images[0], args.turns, args.max_tokens, args.timeout
            )
        stats = engine.info()
        print(f"\nmulti-turn: {args.turns} turns, the history re-sent each time; time to first token (ms)")
        print("| turn | prefix cache on | off | speed-up |\n|---|---|---|---|")
        for k, (on, off) in enumerate(zip(cached_ttft, plain_ttft)):
            print(f"| {k + 1} | {on * 1e3:.0f} | {off * 1e3:.0f} | {off / on:.1f}x |")
        same = "yes" if cached_answers == plain_answers else "NO"
        print(
            f"answers token-for-token equal to the uncached server: {same}; cache: {stats['prefix_cache_hits']} hits, "
            f"{stats['prefix_cache_mib']} MiB held, {stats['feature_cache_hits']} image-feature hits"
        )
    if args.long_prompt:
        gaps = long_prefill_gaps(engine, args.long_prompt)
        print(
            f"\nwhile a {gaps['prompt']}-token prompt was prefilled ({gaps['prefill_s']:.1f} s), a running stream "
            f"produced {gaps['tokens']} tokens: inter-token gap p50 {gaps['p50_gap']:.2f} s, max {gaps['max_gap']:.2f} s"
        )
    clients.shutdown()
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
