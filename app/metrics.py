"""`GET /metrics`: the server's load and latencies in Prometheus' text format (`prometheus_client`).

Per app, in its own registry (two servers in one process keep their own counts):
- `mllm_requests_total{route, status}`: every answered request by route and HTTP status (unknown paths are one
  `other` route, so a client cannot grow the label set);
- `mllm_time_to_first_token_seconds` and `mllm_time_per_output_token_seconds`: histograms over the replies
  (OpenAI and Ollama routes alike), the first from the request's arrival (queue, image decode and prefill included);
- read from the engine at each scrape: `mllm_generated_tokens_total`, `mllm_requests_running`,
  `mllm_requests_waiting`, `mllm_batch_size` (replies in the last decode step), the prefix cache's hits, misses,
  reused tokens, entries and bytes, and the image feature cache's hits and misses.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: a cached short prompt answers its first token in ~20 ms, a queued 8-image one in tens of seconds.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Seconds a token: llama.cpp decodes the default model at ~8 ms a token alone, ~60 ms in a wide batch on 2 cores.
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2)


class Metrics:
    def __init__(self, engine, routes: tuple[str, ...]):
        self.registry = CollectorRegistry()
        self.routes = frozenset(routes)
        self.requests = Counter(
            "mllm_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=self.registry
        )
        self.ttft = Histogram(
            "mllm_time_to_first_token_seconds",
            "From a request's arrival to its reply's first text",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.per_token = Histogram(
            "mllm_time_per_output_token_seconds",
            "A reply's decode time over its tokens after the first",
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine))

    def reply_done(self, started: float, first: float | None, tokens: int) -> None:
        """A reply ended: `started` its request's arrival, `first` its first text (None: it produced none), on
        `time.perf_counter`'s clock."""
        if first is None:
            return
        self.ttft.observe(first - started)
        if tokens > 1:
            self.per_token.observe((time.perf_counter() - first) / (tokens - 1))

    def route(self, path: str) -> str:
        return path if path in self.routes else "other"

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """The engine's own counters and gauges, read at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        info = self.engine.info()

        def counter(name: str, doc: str, value) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value or 0)

        def gauge(name: str, doc: str, value) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value or 0)

        yield counter("mllm_generated_tokens", "Tokens generated since start", info["generated_tokens"])
        yield gauge("mllm_requests_running", "Replies admitted and generating", info["running"])
        yield gauge("mllm_requests_waiting", "Requests waiting in the queue", info["waiting"])
        yield gauge("mllm_batch_size", "Replies decoded in the last decode step", self.engine.batcher.batch_size)
        yield counter("mllm_prefix_cache_hits", "Prompts that reused cached KV", info.get("prefix_cache_hits"))
        yield counter("mllm_prefix_cache_misses", "Prompts with no cached KV", info.get("prefix_cache_misses"))
        yield counter(
            "mllm_prefix_cache_reused_tokens",
            "Prompt tokens not prefilled again",
            info.get("prefix_cache_reused_tokens"),
        )
        yield gauge("mllm_prefix_cache_entries", "Prefixes held", info.get("prefix_cache_entries"))
        cache = self.engine.prefix_cache
        yield gauge("mllm_prefix_cache_bytes", "KV bytes held", cache.used_bytes if cache is not None else 0)
        yield counter("mllm_feature_cache_hits", "Images whose features were cached", info.get("feature_cache_hits"))
        yield counter("mllm_feature_cache_misses", "Images encoded", info.get("feature_cache_misses"))


class RequestCounter:
    """ASGI middleware: counts each HTTP response by route and status into `metrics.requests`."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(self.metrics.route(scope["path"]), str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counting_send)
