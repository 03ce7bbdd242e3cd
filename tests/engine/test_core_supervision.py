"""The supervision policy without processes: the restart budget, and what a core death does
to in-flight requests and the log."""

from __future__ import annotations

import asyncio
import logging

import pytest

from jaxserve.config import EngineArgs
from jaxserve.engine import ipc
from jaxserve.engine.async_llm import AsyncLLM
from jaxserve.engine.client import EngineDeadError
from jaxserve.engine.core_supervisor import RestartBudget, describe_exit
from jaxserve.engine.inflight import RequestEntry


def test_budget_per_window_with_backoff():
    budget = RestartBudget(max_restarts=3, window_s=100.0)
    assert [budget.take(t) for t in (0.0, 1.0, 2.0)] == [0.0, 1.0, 2.0]
    assert budget.take(3.0) is None  # a fourth death within the window: give up
    assert budget.take(100.5) == 2.0  # the first restart left the window: one seat free
    assert budget.take(100.6) is None


def test_zero_never_restarts_and_negative_is_refused():
    assert RestartBudget(max_restarts=0, window_s=600.0).take(0.0) is None
    with pytest.raises(ValueError, match="max_core_restarts"):
        RestartBudget(max_restarts=-1, window_s=600.0)


def test_exit_descriptions_are_short():
    assert describe_exit(-9) == "the engine core process was killed by SIGKILL"
    assert describe_exit(1) == "the engine core process exited with code 1"


class _FatalCore:
    """A core process stand-in whose loop reports a fatal device error, then lives on."""

    def __init__(self) -> None:
        self._messages = [
            ipc.Error(
                message="engine step failed on the device (XlaRuntimeError)",
                fatal=True,
                traceback='Traceback (most recent call last):\n  File "/x/runner.py", line 1',
            )
        ]

    async def poll(self, timeout_ms: int) -> bool:
        return bool(self._messages)

    async def recv_nowait(self):
        return self._messages.pop(0) if self._messages else None

    def is_alive(self) -> bool:
        return True


async def test_fatal_error_is_logged_with_traceback_and_clients_get_a_short_reason(caplog):
    llm = AsyncLLM(EngineArgs(model="unused"))
    entry = RequestEntry(asyncio.Queue(), None, ["r:0"], generation=0)
    llm._inflight.requests["r"] = entry
    supervisor = llm._supervisor
    supervisor.core, supervisor.pid = _FatalCore(), 4242

    async def no_restart(death) -> bool:
        return False  # stop after the death (restarting is covered with real processes)

    supervisor._restart = no_restart
    with caplog.at_level(logging.ERROR):
        await asyncio.wait_for(supervisor.run(), 5.0)
    err = entry.queue.get_nowait()
    assert isinstance(err, EngineDeadError) and "XlaRuntimeError" in str(err)
    assert "Traceback" not in str(err) and "/" not in str(err)
    assert "restarting" in llm.unavailable_reason and llm.dead_reason is None
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(logged) == 1 and 'File "/x/runner.py"' in logged[0] and "pid 4242" in logged[0]
