"""/livez, /readyz, /health: reasons, draining, and the cached, shared health probe."""

from __future__ import annotations

import asyncio

from jaxserve.core.outputs import SchedulerStats
from server.state import STATE_KEY


async def test_livez(client, engine):
    assert (await client.get("/livez")).status == 200
    engine.heartbeat = 60.0  # idle engines may be quiet
    assert (await client.get("/livez")).status == 200
    engine._stats = SchedulerStats(num_running_reqs=1)
    r = await client.get("/livez")
    assert r.status == 503 and "no progress" in (await r.json())["reason"]
    engine.heartbeat = 0.1
    assert (await client.get("/livez")).status == 200
    engine.dead = "boom"
    assert (await client.get("/livez")).status == 503


async def test_readyz(client, engine):
    assert (await client.get("/readyz")).status == 200
    engine.ready = False
    r = await client.get("/readyz")
    assert r.status == 503 and "not ready" in (await r.json())["reason"]
    engine.ready = True
    client.server.app[STATE_KEY].draining = True
    r = await client.get("/readyz")
    assert r.status == 503 and "draining" in (await r.json())["reason"]
    # while draining, new generation requests are refused
    r = await client.post("/v1/completions", json={"prompt": "x"})
    assert r.status == 503 and (await r.json())["error"]["code"] == "server_draining"
    client.server.app[STATE_KEY].draining = False
    engine.dead = "gone"
    r = await client.get("/readyz")
    assert r.status == 503 and "gone" in (await r.json())["reason"]


async def test_health_probe_is_cached_and_shared(client, engine):
    engine.health_delay = 0.05
    first, second = await asyncio.gather(client.get("/health"), client.get("/health"))
    assert first.status == second.status == 200
    assert engine.num_health_checks == 1  # concurrent callers shared the probe
    assert (await client.get("/health")).status == 200
    assert engine.num_health_checks == 1  # within 5 s: the cached answer


async def test_health_failure_and_dead(client, engine):
    engine.health_error = RuntimeError("step failed")
    r = await client.get("/health")
    assert r.status == 503 and "step failed" in (await r.json())["reason"]
    engine.dead = "oom"
    r = await client.get("/health")
    assert r.status == 503 and "oom" in (await r.json())["reason"]


async def test_health_timeout(client, engine):
    from server.health import HEALTH_KEY

    probe = client.server.app[HEALTH_KEY]
    probe._timeout = 0.01
    engine.health_delay = 5.0
    r = await client.get("/health")
    assert r.status == 503 and "timed out" in (await r.json())["reason"]
