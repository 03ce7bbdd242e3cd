"""The engine-core process as the API process sees it, and its supervision.

CoreProcess is one process: spawn, sockets, Ready, stop. CoreSupervisor (AsyncLLM's one
background task) reads the live core, notices its death (exit, kill -9, a fatal Error, no
heartbeat while there is work) and starts a new CoreProcess, with fresh sockets in a fresh
temp dir, so nothing queued for (or sent by) the dead core can reach the new one.
RestartBudget decides whether a death may be healed (see AsyncLLM's NOTE on restarts).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import zmq
import zmq.asyncio

from jaxserve.config import EngineArgs
from jaxserve.engine import ipc
from jaxserve.engine.core_proc import run_engine_core

logger = logging.getLogger(__name__)

# How often a wait for the core wakes up to check that its process still lives.
POLL_INTERVAL_MS = 100
# seconds a dead core's process gets to exit on its own before it is killed
_DEAD_CORE_EXIT_S = 2.0


class CoreStartError(RuntimeError):
    """The engine core failed before it was ready (the message is the core's own)."""

    def __init__(self, message: str, traceback: str | None = None) -> None:
        super().__init__(message)
        # the core's traceback, when it sent one (for the log)
        self.traceback = traceback


def describe_exit(exitcode: int | None) -> str:
    """A short reason for a process that ended: its exit code, or the signal that killed it."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"the engine core process was killed by {name}"
    return f"the engine core process exited with code {exitcode}"


class CoreProcess:
    """Spawns `run_engine_core` and binds the two sockets it connects to."""

    def __init__(self, args: EngineArgs) -> None:
        self.paths = ipc.IpcPaths.make()
        # Sync PUSH for sending (usable from a generator's finally without awaiting; an
        # unlimited high-water mark means send never blocks); asyncio PULL for the reader.
        self._ctx = zmq.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.bind(self.paths.to_core)
        self._actx = zmq.asyncio.Context()
        self._pull = self._actx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(self.paths.from_core)
        self._codec = ipc.client_codec()
        self._is_closed = False
        # spawn: a fresh interpreter (forking a process with a live JAX runtime is unsafe).
        # daemon: an interpreter exit that skips shutdown() still takes the core down.
        # (multiprocessing pickles `args` to start the child; that is process start-up from
        # our own objects, not the IPC wire, which stays msgpack-only.)
        ctx = multiprocessing.get_context("spawn")
        self.proc = ctx.Process(
            target=run_engine_core,
            args=(args, self.paths, os.getpid()),
            name="jaxserve-engine-core",
            daemon=True,
        )
        self.proc.start()
        self.pid: int | None = self.proc.pid

    def is_alive(self) -> bool:
        return self.proc.is_alive()  # a non-blocking waitpid

    @property
    def exitcode(self) -> int | None:
        return self.proc.exitcode

    async def wait_ready(self) -> ipc.Ready:
        """Waits for Ready; raises CoreStartError with the core's error, or when it exits."""
        while True:
            if await self._pull.poll(POLL_INTERVAL_MS):
                msg = self._codec.decode(await self._pull.recv())
                if isinstance(msg, ipc.Ready):
                    return msg
                if isinstance(msg, ipc.Error):
                    raise CoreStartError(msg.message, msg.traceback)
            elif not self.proc.is_alive():
                raise CoreStartError(f"{describe_exit(self.proc.exitcode)} before it was ready")

    async def poll(self, timeout_ms: int) -> bool:
        return bool(await self._pull.poll(timeout_ms))

    async def recv_nowait(self) -> msgspec.Struct | None:
        """The next message already received, decoded; None when there is none."""
        try:
            data = await self._pull.recv(zmq.NOBLOCK)
        except zmq.Again:
            return None
        return self._codec.decode(data)

    def send(self, data: bytes) -> None:
        """Queues encoded bytes for the core (never blocks)."""
        self._push.send(data, zmq.NOBLOCK)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()

    async def stop(self, timeout: float, *, shutdown: bytes | None = None) -> None:
        """Ends the process: `shutdown` (an encoded Shutdown) first if given, then waits up to
        `timeout` s, then SIGTERM, then SIGKILL (5 s each)."""
        proc = self.proc
        loop = asyncio.get_running_loop()
        if shutdown is not None and proc.is_alive():
            try:
                self.send(shutdown)
            except zmq.ZMQError:
                pass
        for stop in (None, proc.terminate, proc.kill):
            if not proc.is_alive():
                break
            if stop is not None:
                stop()
            await loop.run_in_executor(None, proc.join, timeout if stop is None else 5.0)

    def close(self) -> None:
        """Closes the sockets and removes the temp dir (call after stop); idempotent."""
        if self._is_closed:
            return
        self._is_closed = True
        if not self.proc.is_alive():
            self.proc.join(0)
            self.proc.close()  # releases its sentinel fd
        self._push.close()
        self._pull.close()
        self._ctx.term()
        self._actx.term()
        self.paths.cleanup()


class RestartBudget:
    """At most `max_restarts` restarts within any `window_s` seconds (0: never restart).

    A core that dies now and then (days apart) is always healed; one that keeps dying (a
    broken device, a bad deployment) exhausts the budget, and the server exits non-zero so
    that its supervisor sees it. Restarts after the first in a window wait a little longer
    each time (1, 2, 4, ... up to 10 s), so a crash loop does not spin.
    """

    def __init__(self, max_restarts: int, window_s: float) -> None:
        if max_restarts < 0:
            raise ValueError(f"max_core_restarts must be >= 0, got {max_restarts}")
        self.max_restarts = max_restarts
        self.window_s = window_s
        # monotonic times of the restarts within the window
        self._times: collections.deque[float] = collections.deque()

    def take(self, now: float | None = None) -> float | None:
        """Counts one restart; returns the seconds to wait before it, or None if exhausted."""
        now = time.monotonic() if now is None else now
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) >= self.max_restarts:
            return None
        self._times.append(now)
        n = len(self._times)
        return 0.0 if n == 1 else min(2.0 ** (n - 2), 10.0)


@dataclass
class Death:
    """Why a core process is gone."""

    # short, shown to clients and /health
    reason: str
    # the core's traceback when it sent one (the log only)
    traceback: str | None = None


class CoreSupervisor:
    """Keeps an engine-core process serving: reads it, sees it die, starts a new one.

    The owner (AsyncLLM) passes `on_message` (every message of the live core but a fatal
    Error), `on_death` (a short reason: fail whatever was in flight) and `has_work` (whether
    a silent core counts as hung). `run()` is the owner's one background task.
    """

    def __init__(
        self,
        args: EngineArgs,
        *,
        on_message: Callable[[msgspec.Struct], None],
        on_death: Callable[[str], None],
        has_work: Callable[[], bool],
        hang_timeout_s: float,
        max_restarts: int,
        restart_window_s: float,
    ) -> None:
        self.args = args
        self._on_message = on_message
        self._on_death = on_death
        self._has_work = has_work
        self.hang_timeout_s = hang_timeout_s
        self.budget = RestartBudget(max_restarts, restart_window_s)
        self.startup_timeout_s = 1800.0
        # the live (or starting) core; None between a death and the next spawn
        self.core: CoreProcess | None = None
        # the pid of the latest core started (still readable after it is gone)
        self.pid: int | None = None
        # bumped at each death: what was sent to a dead core is never aborted in a new one
        self.generation = 0
        # set while a new core starts after a death (a short reason)
        self.restarting: str | None = None
        # set when the budget is spent (a short reason); gave_up is set with it
        self.gave_up_reason: str | None = None
        self.gave_up = asyncio.Event()
        # cores started after the first
        self.num_restarts = 0
        # monotonic time of the last message from the core (a heartbeat at least every 0.25 s)
        self.last_message_time = time.monotonic()

    async def start(self, startup_timeout_s: float) -> ipc.Ready:
        """Spawns the first core and waits for its Ready (CoreStartError on failure)."""
        self.startup_timeout_s = startup_timeout_s
        self._spawn()
        assert self.core is not None
        ready = await asyncio.wait_for(self.core.wait_ready(), startup_timeout_s)
        self.last_message_time = time.monotonic()
        return ready

    def _spawn(self) -> None:
        self.core = CoreProcess(self.args)
        self.pid = self.core.pid

    def send(self, data: bytes) -> None:
        if self.core is None:
            raise zmq.ZMQError(msg="no engine core")
        self.core.send(data)

    async def run(self) -> None:
        """Reads the live core until it dies, then heals it (or gives up)."""
        try:
            while True:
                assert self.core is not None
                death = await self._watch(self.core)
                detail = f"\n{death.traceback.rstrip()}" if death.traceback else ""
                logger.error("engine core (pid %s) died: %s%s", self.pid, death.reason, detail)
                self.generation += 1
                self.restarting = f"the engine core is restarting ({death.reason})"
                self._on_death(self.restarting)
                if not await self._restart(death):
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # a supervisor bug must not leave requests hanging
            logger.exception("the engine core's supervisor failed")
            self._give_up("the engine client failed (see the server log)")
            raise

    async def _watch(self, core: CoreProcess) -> Death:
        """Hands the core's messages on until it dies; returns why."""
        while True:
            if await core.poll(POLL_INTERVAL_MS):
                while (msg := await core.recv_nowait()) is not None:
                    self.last_message_time = time.monotonic()
                    if isinstance(msg, ipc.Error) and msg.fatal:
                        return Death(msg.message, msg.traceback)
                    self._on_message(msg)
            if not core.is_alive():
                return Death(describe_exit(core.exitcode))
            silent_s = time.monotonic() - self.last_message_time
            if self._has_work() and silent_s > self.hang_timeout_s:
                core.kill()
                return Death(f"the engine core sent no heartbeat for {silent_s:.0f} s")

    async def _restart(self, death: Death) -> bool:
        """Replaces the dead core with a new, ready one; False when the budget is spent."""
        while True:
            old, self.core = self.core, None
            if old is not None:
                await old.stop(_DEAD_CORE_EXIT_S)
                old.close()
            delay = self.budget.take()
            if delay is None:
                self._give_up(
                    f"{death.reason}; not restarted: max_core_restarts={self.budget.max_restarts}"
                    f" within {self.budget.window_s:.0f} s spent"
                )
                return False
            if delay:
                await asyncio.sleep(delay)
            self.num_restarts += 1
            start = time.monotonic()
            self._spawn()
            assert self.core is not None
            try:
                await asyncio.wait_for(self.core.wait_ready(), self.startup_timeout_s)
            except (CoreStartError, TimeoutError) as e:
                tb = getattr(e, "traceback", None)
                detail = f"\n{tb.rstrip()}" if tb else ""
                logger.error("engine core restart failed: %s%s", e or "timed out", detail)
                death = Death("the engine core failed to restart")
                self.restarting = f"the engine core is restarting ({death.reason})"
                continue
            self.last_message_time = time.monotonic()
            self.restarting = None
            logger.warning(
                "engine core restarted (pid %s, restart %d) in %.1f s; serving again",
                self.pid,
                self.num_restarts,
                time.monotonic() - start,
            )
            return True

    def _give_up(self, reason: str) -> None:
        logger.error("engine gives up: %s", reason)
        self.gave_up_reason = reason
        self.restarting = None
        self._on_death(reason)
        self.gave_up.set()

    async def stop(self, timeout: float, shutdown: bytes) -> None:
        """Stops the current core (Shutdown first) and closes it."""
        core, self.core = self.core, None
        if core is not None:
            await core.stop(timeout, shutdown=shutdown)
            core.close()
