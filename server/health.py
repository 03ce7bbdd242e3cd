"""GET /livez, /readyz, /health: three questions a load balancer or orchestrator asks.

- /livez: should this process be restarted? (the engine is dead, or has work and is stuck)
- /readyz: should traffic be sent here? (loaded, warmed up, not draining, engine alive)
- /health: can the engine really generate right now? (a one-token probe, cached 5 s)

While the engine heals itself (a new engine core starting after one died) /readyz and
/health answer 503 with a short reason and /livez stays 200: restarting the whole process
would only start over what is already under way. Reasons never carry a traceback or a path.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from jaxserve.engine.client import EngineClient, EngineDeadError
from server.state import STATE_KEY

# An engine with pending work that has not reported progress for this long is stuck.
HEARTBEAT_TIMEOUT_S = 5.0
# /health probes the engine at most this often; callers in between get the cached answer.
HEALTH_CACHE_S = 5.0
# how long one probe may take before it counts as a failure
HEALTH_PROBE_TIMEOUT_S = 10.0


class HealthProbe:
    """Runs engine.check_health at most once per HEALTH_CACHE_S; concurrent callers share the
    in-flight probe, so a burst of /health calls costs the engine one generation."""

    def __init__(self, engine: EngineClient, timeout: float = HEALTH_PROBE_TIMEOUT_S) -> None:
        self._engine = engine
        self._timeout = timeout
        # (monotonic time of the result, None if healthy else why not)
        self._cached: tuple[float, str | None] | None = None
        self._in_flight: asyncio.Task[str | None] | None = None

    async def check(self) -> str | None:
        """None when healthy, else the reason."""
        unavailable = self._engine.unavailable_reason
        if unavailable is not None:
            # not cached: a healed engine is probed again at once
            return _unavailable(self._engine)
        if self._cached is not None and time.monotonic() - self._cached[0] < HEALTH_CACHE_S:
            return self._cached[1]
        probe = self._in_flight
        if probe is None:
            probe = self._in_flight = asyncio.create_task(self._probe())
            probe.add_done_callback(self._store)
        # shielded: one caller disconnecting must not cancel the probe the others wait on
        return await asyncio.shield(probe)

    async def _probe(self) -> str | None:
        try:
            await asyncio.wait_for(self._engine.check_health(self._timeout), self._timeout + 1.0)
        except TimeoutError:
            return f"health probe timed out after {self._timeout:g} s"
        except EngineDeadError:
            return _unavailable(self._engine) or "engine unavailable"
        except Exception as e:
            return f"health probe failed: {type(e).__name__}: {e}"
        return None

    def _store(self, task: asyncio.Task[str | None]) -> None:
        self._in_flight = None
        if not task.cancelled():
            self._cached = (time.monotonic(), task.result())


def _unavailable(engine: EngineClient) -> str | None:
    """The engine's short reason for not serving, as /readyz and /health say it."""
    if engine.dead_reason is not None:
        return f"engine dead: {engine.dead_reason}"
    reason = engine.unavailable_reason
    return None if reason is None else f"engine unavailable: {reason}"


HEALTH_KEY = web.AppKey("jaxserve_health", HealthProbe)


def _status(reason: str | None) -> web.Response:
    if reason is None:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "unavailable", "reason": reason}, status=503)


async def livez(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    engine = state.engine
    if engine.dead_reason is not None:
        return _status(f"engine dead: {engine.dead_reason}")
    if engine.unavailable_reason is not None:
        return _status(None)  # healing itself: a new core is starting (see the module doc)
    stats = engine.stats
    has_work = state.num_in_flight > 0 or stats.num_running_reqs + stats.num_waiting_reqs > 0
    age = engine.heartbeat_age
    if has_work and age >= HEARTBEAT_TIMEOUT_S:
        return _status(f"engine made no progress for {age:.1f} s with requests pending")
    return _status(None)


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    engine = state.engine
    if engine.dead_reason is not None:
        return _status(f"engine dead: {engine.dead_reason}")
    if state.draining:
        return _status("draining: the server is shutting down")
    if not engine.is_ready:
        return _status(_unavailable(engine) or "engine not ready: loading or warming up")
    return _status(None)


async def health(request: web.Request) -> web.Response:
    return _status(await request.app[HEALTH_KEY].check())
