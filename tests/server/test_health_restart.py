"""The server while the engine heals itself (a new engine core starting after one died)."""

from __future__ import annotations

import pytest

from jaxserve.core.outputs import SchedulerStats
from jaxserve.engine.client import EngineDeadError
from server.app import make_app
from tests.server.fake_engine import FakeEngine

RESTARTING = "the engine core is restarting (the engine core process was killed by SIGKILL)"


class RestartingEngine(FakeEngine):
    """A FakeEngine whose core can be 'restarting', the way AsyncLLM reports it."""

    def __init__(self) -> None:
        super().__init__()
        self.restarting: str | None = None

    @property
    def unavailable_reason(self) -> str | None:
        return self.dead or self.restarting

    @property
    def is_ready(self) -> bool:
        return self.ready and self.unavailable_reason is None

    async def check_health(self, timeout: float) -> None:
        if self.restarting is not None:
            raise EngineDeadError(self.restarting)
        await super().check_health(timeout)

    def generate(self, prompt, params, request_id, **kwargs):
        if self.restarting is not None:
            raise EngineDeadError(self.restarting)
        return super().generate(prompt, params, request_id, **kwargs)


@pytest.fixture
def engine() -> RestartingEngine:
    return RestartingEngine()


@pytest.fixture
async def client(aiohttp_client, engine):
    return await aiohttp_client(make_app(engine), server_kwargs={"handler_cancellation": True})


async def test_restarting_is_unready_and_unhealthy_but_live(client, engine):
    assert (await client.get("/health")).status == 200  # cached as healthy for 5 s
    engine.restarting = RESTARTING
    engine._stats = SchedulerStats(num_running_reqs=1)
    engine.heartbeat = 30.0  # the dead core sent nothing for a while
    for path in ("/readyz", "/health"):
        r = await client.get(path)
        reason = (await r.json())["reason"]
        assert r.status == 503 and "restarting" in reason, (path, reason)
    assert (await client.get("/livez")).status == 200
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status == 503 and r.headers["Retry-After"]
    assert "restarting" in (await r.json())["error"]["message"]

    engine.restarting = None
    engine._stats, engine.heartbeat = SchedulerStats(), 0.0
    for path in ("/readyz", "/health", "/livez"):
        assert (await client.get(path)).status == 200, path
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status == 200


async def test_metrics_count_restarts_and_used_blocks(client, engine):
    engine._stats = SchedulerStats(num_core_restarts=2, num_used_blocks=3)
    text = await (await client.get("/metrics")).text()
    assert 'jaxserve_engine_core_restarts_total{model_name="fake-model"} 2.0' in text
    assert 'jaxserve_kv_cache_used_blocks{model_name="fake-model"} 3.0' in text
