"""`/metrics` (Prometheus' text format, behind the API key) and `--cors-origin`, on the real server on loopback:
the counts move with the requests the test sends, through the OpenAI and the Ollama routes."""

from __future__ import annotations

import httpx
import ollama
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from app.api import create_app, serving
from app.engine import ChatEngine
from mllm.assembly import build_model
from mllm.generation import GenerationConfig

KEY = "test-key"
ORIGIN = "http://localhost:3000"


@pytest.fixture(scope="module")
def engine(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config, device="cpu").eval()
    return ChatEngine(model, name="tiny", max_concurrency=4, gen=GenerationConfig(max_new_tokens=6))


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    r = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(r.text)
        for sample in family.samples
    }


def test_metrics_count_requests_tokens_latencies_and_cache_hits(engine):
    with serving(create_app(engine, api_key=KEY)) as url:
        before = scrape(url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        messages = [{"role": "user", "content": "hello there"}]
        for _ in range(2):  # the second one finds the first one's prefix in the cache
            client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=6, extra_body={"ignore_eos": True}
            )
        ollama.Client(host=url, headers={"Authorization": f"Bearer {KEY}"}).chat(
            model="tiny", messages=messages, options={"num_predict": 4}
        )
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=messages, top_logprobs=99)
        assert httpx.post(f"{url}/v1/chat/completions", json={}).status_code == 401
        assert httpx.get(f"{url}/no/such/path", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
        after = scrape(url)
        assert httpx.get(f"{url}/metrics").status_code == 401  # the cache counts are not for outsiders

    def moved(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("mllm_requests_total", route="/v1/chat/completions", status="200") == 2
    assert moved("mllm_requests_total", route="/v1/chat/completions", status="400") == 1
    assert moved("mllm_requests_total", route="/v1/chat/completions", status="401") == 1
    assert moved("mllm_requests_total", route="/api/chat", status="200") == 1
    assert moved("mllm_requests_total", route="other", status="404") == 1
    assert moved("mllm_generated_tokens_total") >= 12 + 1
    assert moved("mllm_time_to_first_token_seconds_count") == 3
    assert moved("mllm_time_per_output_token_seconds_count") == 3
    assert moved("mllm_prefix_cache_hits_total") >= 1
    assert after[("mllm_prefix_cache_bytes", ())] > 0
    assert after[("mllm_requests_running", ())] == 0 and after[("mllm_requests_waiting", ())] == 0
    assert after[("mllm_batch_size", ())] == 0
    ttft_sum = moved("mllm_time_to_first_token_seconds_sum")
    assert 0 < ttft_sum < 60


def test_cors_answers_the_named_origins_only(engine):
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    with serving(create_app(engine, api_key=KEY, cors_origins=[ORIGIN])) as url:
        r = httpx.options(f"{url}/v1/chat/completions", headers=preflight)  # no key: a preflight never carries it
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        r = httpx.get(f"{url}/api/tags", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        r = httpx.options(f"{url}/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    with serving(create_app(engine, api_key=KEY)) as url:  # none by default
        r = httpx.get(f"{url}/api/tags", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
        assert "access-control-allow-origin" not in r.headers
        assert httpx.options(f"{url}/v1/chat/completions", headers=preflight).status_code == 401
