"""One engine-core process as the API process sees it: spawn, sockets, Ready, death, stop.

AsyncLLM holds one CoreProcess at a time; a restart closes the dead one and makes a new one,
with fresh sockets in a fresh temp dir, so nothing queued for (or sent by) the dead core can
reach the new one. RestartBudget is the policy that decides whether a death may be healed.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import os
import signal
import time

import msgspec
import zmq
import zmq.asyncio

from jaxserve.config import EngineArgs
from jaxserve.engine import ipc
from jaxserve.engine.core_proc import run_engine_core

# How often a wait for the core wakes up to check that its process still lives.
POLL_INTERVAL_MS = 100


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
