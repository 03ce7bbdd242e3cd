"""/metrics holds every metric; /openapi.json describes every route."""

from __future__ import annotations

from jaxserve.core.outputs import SchedulerStats
from server.app import ROUTES

METRICS = [
    "jaxserve_num_requests_running",
    "jaxserve_num_requests_waiting",
    "jaxserve_kv_cache_usage_perc",
    "jaxserve_prefix_cache_queries_total",
    "jaxserve_prefix_cache_hits_total",
    "jaxserve_num_preemptions_total",
    "jaxserve_prompt_tokens_total",
    "jaxserve_generation_tokens_total",
    "jaxserve_request_success_total",
    "jaxserve_time_to_first_token_seconds_bucket",
    "jaxserve_inter_token_latency_seconds_bucket",
    "jaxserve_e2e_request_latency_seconds_count",
    "jaxserve_engine_steps_total",
    "jaxserve_engine_step_seconds_total",
    "jaxserve_num_compiles_after_warmup",
]


async def test_metrics(client, engine):
    engine._stats = SchedulerStats(
        num_running_reqs=3, num_waiting_reqs=2, kv_cache_usage=0.5, prefix_cache_hits=7
    )
    await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 4})
    r = await client.get("/metrics")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    text = await r.text()
    for name in METRICS:
        assert name in text, name
    assert 'jaxserve_num_requests_running{model_name="fake-model"} 3.0' in text
    assert 'jaxserve_prefix_cache_hits_total{model_name="fake-model"} 7.0' in text
    assert 'jaxserve_prompt_tokens_total{model_name="fake-model"} 3.0' in text
    assert 'jaxserve_generation_tokens_total{model_name="fake-model"} 4.0' in text
    assert 'success_total{finished_reason="length",model_name="fake-model"} 1.0' in text
    assert 'jaxserve_e2e_request_latency_seconds_count{model_name="fake-model"} 1.0' in text


async def test_openapi_covers_every_route(client):
    spec = await (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.1")
    for method, path, _ in ROUTES:
        assert method.lower() in spec["paths"].get(path, {}), (method, path)
    emb = spec["paths"]["/v1/embeddings"]["post"]["summary"]
    assert "mean" in emb and "L2" in emb
    schemas = spec["components"]["schemas"]

    def body_props(path: str) -> dict:
        ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        return schemas[ref["$ref"].rsplit("/", 1)[1]]["properties"]

    from server.protocol import CHAT_FIELDS, COMPLETION_FIELDS

    assert set(body_props("/v1/completions")) == COMPLETION_FIELDS
    assert set(body_props("/v1/chat/completions")) == CHAT_FIELDS
    # the bounds the engine stores values in are in the document, not just in the code
    assert body_props("/v1/completions")["top_k"]["anyOf"][0]["maximum"] == 2**31 - 1
