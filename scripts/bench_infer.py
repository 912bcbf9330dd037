"""Inference benchmark: mllm against transformers' own `generate` on the same LLM weights, one process.

Measures, for the same prompt and image: prefill ms, time to first token, decode tokens/s and the
peak RSS growth while generating; then the follow-up turn's time to first token with the
session's KV reuse against re-prefilling a ~1k-token history. Prints a markdown table of ratios.

    .venv/bin/python scripts/bench_infer.py [--model default] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

import torch
from transformers.utils import logging as hf_logging

from mllm.generation import GenerationConfig, Reply, image_features, stream
from mllm.loading import load_model
from mllm.session import ChatSession

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Samples RSS every millisecond in a thread; `.growth` is the peak above the starting RSS."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.growth = self.peak - self.start


def bench_mllm(model, input_ids, features, n_tokens):
    """Our decode recipe, as every mllm entry point runs it: (prefill_s, ttft_s, decode_tok_s, rss_growth)."""
    gen = GenerationConfig(max_new_tokens=n_tokens, ignore_eos=True)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        reply = Reply(model, input_ids, gen, features=features)
        next(reply)  # a piece of text: the first token (or the first whole character)
        t1 = time.perf_counter()
        first = len(reply.ids)
        for _ in reply:
            pass
        t2 = time.perf_counter()
    return t1 - t0, t1 - t0, (len(reply.ids) - first) / (t2 - t1), mem.growth


@torch.inference_mode()
def bench_transformers(model, input_ids, features, n_tokens):
    """transformers' generate on the same LLM and the same merged prompt embeddings."""
    llm = model.llm
    embeds = model.embed(input_ids[None], image_features=features)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    kwargs = dict(inputs_embeds=embeds, attention_mask=mask, do_sample=False, pad_token_id=0)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        llm.generate(**kwargs, max_new_tokens=1, min_new_tokens=1)
        t1 = time.perf_counter()
        llm.generate(**kwargs, max_new_tokens=n_tokens, min_new_tokens=n_tokens)
        t2 = time.perf_counter()
    first = t1 - t0
    return first, first, (n_tokens - 1) / ((t2 - t1) - first), mem.growth


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    hf_logging.disable_progress_bar()
    from PIL import Image
    from skimage import data

    model = load_model(args.model, device="cpu")
    image = Image.fromarray(data.chelsea())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    encoded = model.processor.encode(messages, [image], add_generation_prompt=True)
    features = image_features(model, encoded)
    bench_mllm(model, encoded.input_ids, features, 4)  # warm-up both paths
    bench_transformers(model, encoded.input_ids, features, 4)
    ours, theirs = [], []
    for _ in range(args.repeats):  # interleaved: clock and cache drift hit both sides alike
        ours.append(bench_mllm(model, encoded.input_ids, features, args.tokens))
        theirs.append(bench_transformers(model, encoded.input_ids, features, args.tokens))
    med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
    history, reuse, reprefill = bench_follow_up(model, image, args.repeats)
    rows = [
        ("prefill (ms)", med(ours, 0) * 1e3, med(theirs, 0) * 1e3, med(theirs, 0) / med(ours, 0)),
        ("time to first token (ms)", med(ours, 1) * 1e3, med(theirs, 1) * 1e3, med(theirs, 1) / med(ours, 1)),
        ("decode (tokens/s)", med(ours, 2), med(theirs, 2), med(ours, 2) / med(theirs, 2)),
        ("peak RSS growth (MiB)", med(ours, 3) / 2**20, med(theirs, 3) / 2**20, None),
        (f"follow-up TTFT at {history} tokens (ms)", reuse * 1e3, reprefill * 1e3, reprefill / reuse),
    ]
    print(f"prompt: {len(encoded.input_ids)} tokens ({model.tokens_per_image} image tokens), {args.tokens} new tokens")
    print(f"torch threads: {torch.get_num_threads()}, median of {args.repeats}")
    print("| measure | mllm | transformers generate (or re-prefill) | mllm advantage |")
    print("|---|---|---|---|")
    for name, a, b, ratio in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {'' if ratio is None else f'{ratio:.2f}x'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(zip(("measure", "mllm", "baseline", "ratio"), r)) for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
