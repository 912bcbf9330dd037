"""The API server under hostile requests: its peak memory, and how long an ordinary request waits meanwhile.

Starts `mllm api` (the default model unless --model) in a process of its own on loopback, measures an ordinary
one-image question alone, then sends it again every --interval seconds while --clients threads loop over a
corpus of hostile requests for --seconds: the largest images accepted (6324 x 6324, 8 to a request, a few KB
each as PNG), images whose canvas or frames would be huge, containers outside the allow-list, 100 images in
one request, a 2,000-turn history, a chunked streaming body, too many stop sequences. Prints the server's RSS
(before, peak, after) and the ordinary request's latency alone and under attack, with the status each hostile
kind got.

    .venv/bin/python scripts/bench_hostile.py [--model default] [--clients 8] [--seconds 60]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter

import httpx
from PIL import Image

SIDE = 6324  # the largest square under the default max_pixels (40,000,000)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def one_bit_png(width: int, height: int) -> bytes:
    """Black, one bit a pixel: zero rows deflate ~1000:1, so even 40000 x 1000 is 5 KB."""
    rows = zlib.compress(bytes(((width + 7) // 8 + 1) * height), 9)
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def saved(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def ask(text: str, *images: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def corpus() -> dict[str, dict]:
    """Hostile request bodies by kind (built once; the large-but-accepted images compress to a few KB)."""
    accepted_1bit = uri(one_bit_png(SIDE, SIDE))
    accepted_rgba = uri(saved(Image.new("RGBA", (SIDE, SIDE), (200, 30, 30, 128)), "PNG", compress_level=9))
    wide = uri(one_bit_png(40_000, 1_000))
    ico = uri(saved(Image.new("RGB", (256, 256)), "ICO"), "image/x-icon")
    frames = [Image.new("L", (4000, 4000), v) for v in (0, 255)]
    gif = uri(saved(frames[0], "GIF", save_all=True, append_images=frames[1:]), "image/gif")
    turns = []
    for i in range(1000):
        turns += [{"role": "user", "content": f"what is it {i}"}, {"role": "assistant", "content": "a circle"}]
    return {
        "8 accepted 6324x6324 1-bit": {"messages": ask("what is it", *[accepted_1bit] * 8)},
        "8 accepted 6324x6324 RGBA": {"messages": ask("what is it", *[accepted_rgba] * 8)},
        "canvas 40000x1000": {"messages": ask("what is it", wide)},
        "ICO": {"messages": ask("what is it", ico)},
        "2-frame 4000x4000 GIF": {"messages": ask("what is it", gif)},
        "100 images": {"messages": ask("so many", *[accepted_1bit] * 100)},
        "2,000-turn history": {"messages": turns[:1024]},
        "5 stop sequences": {"messages": ask("hi"), "stop": ["a", "b", "c", "d", "e"]},
        "response_format": {"messages": ask("hi"), "response_format": {"type": "json_object"}},
    }


class RSS:
    """Samples a process's resident memory (VmRSS) every 20 ms."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.02)

    def __enter__(self):
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--clients", type=int, default=8, help="hostile client threads")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--interval", type=float, default=0.5, help="between two ordinary requests")
    args = parser.parse_args(argv)

    bodies = corpus()
    ordinary = {"messages": ask("What colour is the circle?", uri(saved(Image.new("RGB", (224, 224), "red"), "PNG")))}
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    command = [sys.executable, "-m", "app.cli", "api", "--model", args.model, "--port", str(port)]
    server = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.5)
        model = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]

        def send(body: dict, timeout: float = 300) -> tuple[int, float]:
            t0 = time.perf_counter()
            r = httpx.post(url, json={"model": model, "max_tokens": 16, **body}, timeout=timeout)
            return r.status_code, time.perf_counter() - t0

        alone = [send(ordinary)[1] for _ in range(5)]
        statuses: dict[str, Counter] = {kind: Counter() for kind in bodies}
        under_attack: list[tuple[int, float]] = []
        stop = threading.Event()

        def hostile(offset: int) -> None:
            kinds = list(bodies)
            i = offset
            while not stop.is_set():
                kind = kinds[i % len(kinds)]
                try:
                    statuses[kind][send(bodies[kind])[0]] += 1
                except httpx.HTTPError as e:
                    statuses[kind][type(e).__name__] += 1
                i += 1

        def chunked() -> None:  # a streaming request whose body comes chunked, again and again
            payload = json.dumps({"model": model, "messages": ask("hi"), "stream": True, "max_tokens": 8}).encode()
            while not stop.is_set():
                with httpx.stream("POST", url, content=iter([payload[:10], payload[10:]]), timeout=300) as r:
                    r.read()
                    statuses.setdefault("chunked streaming body", Counter())[r.status_code] += 1

        with RSS(server.pid) as rss:
            before = rss.now()
            threads = [threading.Thread(target=hostile, args=(i,)) for i in range(args.clients)]
            threads.append(threading.Thread(target=chunked))
            for t in threads:
                t.start()
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                under_attack.append(send(ordinary))
                time.sleep(args.interval)
            stop.set()
            for t in threads:
                t.join()
            after = rss.now()
    finally:
        server.terminate()
        server.wait(30)

    mib = 2**20
    lat = sorted(t for _, t in under_attack)
    print(f"server RSS: before {before / mib:.0f} MiB, peak {rss.peak / mib:.0f} MiB, after {after / mib:.0f} MiB")
    print(f"ordinary request alone: median {statistics.median(alone):.2f} s (5 runs)")
    ok = sum(1 for status, _ in under_attack if status == 200)
    print(
        f"ordinary request under attack: {ok}/{len(under_attack)} answered 200, median {statistics.median(lat):.2f} s, "
        f"p95 {lat[int(0.95 * (len(lat) - 1))]:.2f} s, max {lat[-1]:.2f} s"
    )
    print("| hostile request | answers |\n|---|---|")
    for kind, counts in statuses.items():
        print(f"| {kind} | {', '.join(f'{n} x {status}' for status, n in counts.most_common())} |")


if __name__ == "__main__":
    main()
