"""AsyncLLM: the EngineClient the API server uses, with the engine core in its own process.

The API process owns the tokenizer, the InputProcessor (validation, n fan-out, seeds) and the
OutputProcessor (incremental detokenization, stop strings, n fan-in); the engine-core process
(core_proc.py) sees only token ids. One background reader task decodes every core message and
feeds per-request asyncio.Queues; generate() only validates, sends and drains its queue.

NOTE on liveness: the reader polls the core's socket every 100 ms and checks the process each
time (`Process.is_alive`, a non-blocking waitpid), so a crashed or killed core fails every
in-flight request with EngineDeadError within ~0.1 s. A core that is alive but stops sending
heartbeats (a hang) is declared dead after `hang_timeout_s` while requests are pending, and
killed. That timeout is generous by default because heartbeats come from the loop itself and
a step that compiles a new bucket (warmup off, or a model much larger than this machine
likes) legitimately runs for many seconds; `heartbeat_age` exposes the raw signal meanwhile.

The core is started with multiprocessing's "spawn", so a script that creates an AsyncLLM at
import time needs the usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from jaxserve.config import EngineArgs
from jaxserve.core.kv_cache_manager import check_kv_capacity
from jaxserve.core.outputs import SchedulerStats
from jaxserve.engine import ipc
from jaxserve.engine.client import EngineClient, EngineDeadError, EngineOverloadedError
from jaxserve.engine.core_proc import PROBE_ID_PREFIX, run_engine_core
from jaxserve.engine.output_processor import OutputProcessor
from jaxserve.engine.processor import InputProcessor, ProcessedPrompt, PromptType
from jaxserve.model.loader import load_tokenizer
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import SamplingParams, as_token_ids

# How often the reader wakes up to check the core process when no message arrives.
_POLL_INTERVAL_MS = 100


@dataclass
class _RequestEntry:
    """The API-side state of one user request being streamed by generate()."""

    # RequestOutput deltas, or the exception to raise in the consumer
    queue: asyncio.Queue[RequestOutput | BaseException]
    prompt: ProcessedPrompt
    # the core request ids of its completions (n of them)
    core_ids: list[str]
    # True until its first output arrives (counted against max_waiting_requests)
    is_waiting: bool = True
    finished: bool = False


@dataclass
class _Pending:
    """Futures of embed and probe calls, keyed by their ids."""

    embeds: dict[str, asyncio.Future[list[float]]] = field(default_factory=dict)
    probes: dict[str, asyncio.Future[ipc.ProbeResult]] = field(default_factory=dict)


class AsyncLLM(EngineClient):
    """Create with `await AsyncLLM.create(args, ...)`; close with `await llm.shutdown()`."""

    def __init__(
        self,
        args: EngineArgs,
        *,
        max_waiting_requests: int = 1024,
        served_model_name: str | None = None,
        hang_timeout_s: float = 60.0,
    ) -> None:
        """Only records settings; `start()` (or `create()`) spawns the core."""
        self.args = args
        self.model_name = served_model_name or args.model
        # user requests not yet producing output at which generate() raises EngineOverloaded
        self.max_waiting_requests = max_waiting_requests
        self.hang_timeout_s = hang_timeout_s
        self.max_model_len = 0
        self.tokenizer: Any = None
        self.ready: ipc.Ready | None = None
        self.input_processor: InputProcessor | None = None
        self.output_processor: OutputProcessor | None = None
        self._dead_reason: str | None = None
        self._is_shut_down = False
        self._stats = SchedulerStats()
        self._last_heartbeat = time.monotonic()
        self._requests: dict[str, _RequestEntry] = {}
        # core request id -> user request id (for per-request core Errors)
        self._core_to_user: dict[str, str] = {}
        self._pending = _Pending()
        self._ids = itertools.count()
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._core_pid: int | None = None
        self._paths: ipc.IpcPaths | None = None
        self._codec = ipc.client_codec()
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def create(
        cls,
        args: EngineArgs,
        *,
        max_waiting_requests: int = 1024,
        served_model_name: str | None = None,
        hang_timeout_s: float = 60.0,
        startup_timeout_s: float = 1800.0,
    ) -> AsyncLLM:
        llm = cls(
            args,
            max_waiting_requests=max_waiting_requests,
            served_model_name=served_model_name,
            hang_timeout_s=hang_timeout_s,
        )
        await llm.start(startup_timeout_s=startup_timeout_s)
        return llm

    async def start(self, *, startup_timeout_s: float = 1800.0) -> None:
        """Spawns the core, loads the tokenizer meanwhile, and waits for Ready.

        Raises RuntimeError with the core's own error when its start-up fails.
        """
        loop = asyncio.get_running_loop()
        self._paths = ipc.IpcPaths.make()
        # Sync PUSH for sending (usable from a generator's finally without awaiting; an
        # unlimited high-water mark means send never blocks); asyncio PULL for the reader.
        self._ctx = zmq.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.bind(self._paths.to_core)
        self._actx = zmq.asyncio.Context()
        self._pull = self._actx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(self._paths.from_core)
        # spawn: a fresh interpreter (forking a process with a live JAX runtime is unsafe).
        # daemon: an interpreter exit that skips shutdown() still takes the core down.
        # (multiprocessing pickles `args` to start the child; that is process start-up from
        # our own objects, not the IPC wire, which stays msgpack-only.)
        ctx = multiprocessing.get_context("spawn")
        self._proc = ctx.Process(
            target=run_engine_core,
            args=(self.args, self._paths, os.getpid()),
            name="jaxserve-engine-core",
            daemon=True,
        )
        self._proc.start()
        self._core_pid = self._proc.pid
        # The tokenizer loads while the core loads weights; the core's own error (e.g. a bad
        # model path) is the one reported, so it is awaited first.
        tokenizer_name = self.args.tokenizer or self.args.model
        tokenizer_future = loop.run_in_executor(None, load_tokenizer, tokenizer_name)
        try:
            self.ready = await asyncio.wait_for(self._wait_ready(), startup_timeout_s)
            self.tokenizer = await tokenizer_future
        except BaseException:
            tokenizer_future.cancel()
            await self.shutdown()
            raise
        r = self.ready
        self.max_model_len = r.max_model_len
        self.input_processor = InputProcessor(
            self.tokenizer,
            vocab_size=r.vocab_size,
            max_model_len=r.max_model_len,
            eos_token_id=r.eos_token_id,
            seed=self.args.seed,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self._last_heartbeat = time.monotonic()
        self._reader = asyncio.create_task(self._read_loop(), name="jaxserve-async-llm-reader")

    async def _wait_ready(self) -> ipc.Ready:
        assert self._proc is not None
        while True:
            if await self._pull.poll(_POLL_INTERVAL_MS):
                msg = self._codec.decode(await self._pull.recv())
                if isinstance(msg, ipc.Ready):
                    return msg
                if isinstance(msg, ipc.Error):
                    raise RuntimeError(msg.message)
            elif not self._proc.is_alive():
                raise RuntimeError(
                    f"engine core exited with code {self._proc.exitcode} before it was ready"
                )

    # ---- EngineClient ----------------------------------------------------------------

    async def generate(
        self,
        prompt: PromptType | ProcessedPrompt,
        params: SamplingParams,
        request_id: str,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """See EngineClient.generate. Every check runs before the first AddRequest is sent."""
        self._check_alive()
        assert self.input_processor is not None and self.output_processor is not None
        processed = (
            prompt
            if isinstance(prompt, ProcessedPrompt)
            else self.input_processor.process_prompt(prompt)
        )
        self.input_processor.check_params(params)
        self._check_fits(processed, params)
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if request_id.startswith(PROBE_ID_PREFIX):
            raise ValueError(f"request_id must not start with {PROBE_ID_PREFIX!r}")
        num_waiting = sum(e.is_waiting for e in self._requests.values())
        if num_waiting >= self.max_waiting_requests:
            raise EngineOverloadedError(
                f"{num_waiting} requests are waiting (max_waiting_requests="
                f"{self.max_waiting_requests}); retry later"
            )
        requests = self.input_processor.make_requests(
            request_id, processed, params, priority=priority, cache_salt=cache_salt
        )
        core_ids = [r.request_id for r in requests]
        self.output_processor.add_request(request_id, processed, params, core_ids, stream=True)
        entry = _RequestEntry(asyncio.Queue(), processed, core_ids)
        self._requests[request_id] = entry
        for r in requests:
            self._core_to_user[r.request_id] = request_id
            self._send(
                ipc.AddRequest(
                    request_id=r.request_id,
                    prompt_token_ids=r.prompt_token_ids,
                    params=params,
                    sampling_seed=r.sampling_seed,
                    max_tokens=r.max_tokens,
                    eos_token_id=r.eos_token_id,
                    priority=priority,
                    cache_salt=cache_salt,
                    arrival_time=r.arrival_time,
                )
            )
        try:
            while True:
                item = await entry.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            # A consumer that stopped early (disconnect: GeneratorExit / CancelledError) or an
            # error: free the request's blocks in the core at its next loop turn.
            if not entry.finished:
                self._abort(request_id)
            self._forget(request_id)

    async def abort(self, request_id: str) -> None:
        """Ends the request in the core; its generate() ends with finish_reason "abort"."""
        entry = self._requests.get(request_id)
        self._abort(request_id)
        if entry is not None and not entry.finished:
            entry.finished = True
            outputs = [
                CompletionOutput(index=i, text="", token_ids=[], finish_reason="abort")
                for i in range(len(entry.core_ids))
            ]
            entry.queue.put_nowait(
                RequestOutput(
                    request_id=request_id,
                    prompt=entry.prompt.prompt,
                    prompt_token_ids=entry.prompt.prompt_token_ids,
                    outputs=outputs,
                    finished=True,
                )
            )

    async def embed(self, prompt_token_ids: list[int]) -> list[float]:
        """Mean-pooled final hidden state, L2-normalized (see runner/embedder.py)."""
        self._check_alive()
        assert self.ready is not None
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if len(prompt_token_ids) > self.max_model_len:
            raise ValueError(
                f"prompt_token_ids has {len(prompt_token_ids)} tokens, more than "
                f"max_model_len={self.max_model_len}"
            )
        ids = as_token_ids(prompt_token_ids, self.ready.vocab_size, "prompt_token_ids")
        req_id = f"embed-{next(self._ids)}"
        fut: asyncio.Future[list[float]] = asyncio.get_running_loop().create_future()
        self._pending.embeds[req_id] = fut
        try:
            self._send(ipc.Embed(req_id=req_id, token_ids=ids))
            return await fut
        finally:
            self._pending.embeds.pop(req_id, None)

    async def check_health(self, timeout: float) -> None:
        """Raises EngineDeadError (dead core), TimeoutError, or RuntimeError (probe failed)."""
        self._check_alive()
        probe_id = f"probe-{next(self._ids)}"
        fut: asyncio.Future[ipc.ProbeResult] = asyncio.get_running_loop().create_future()
        self._pending.probes[probe_id] = fut
        try:
            self._send(ipc.HealthProbe(probe_id=probe_id))
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise TimeoutError(f"health probe got no token within {timeout} s") from None
        finally:
            self._pending.probes.pop(probe_id, None)

    @property
    def is_ready(self) -> bool:
        return self.ready is not None and self._dead_reason is None

    @property
    def dead_reason(self) -> str | None:
        return self._dead_reason

    @property
    def heartbeat_age(self) -> float:
        """Seconds since the last message from the core (heartbeat or outputs), API clock."""
        return time.monotonic() - self._last_heartbeat

    @property
    def stats(self) -> SchedulerStats:
        return self._stats

    @property
    def core_pid(self) -> int | None:
        """The engine-core process id (for tests and process supervisors)."""
        return self._core_pid

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Shutdown message, join (then SIGTERM, SIGKILL), close sockets, remove the temp dir.

        Idempotent; in-flight requests fail with EngineDeadError("engine shut down").
        """
        if self._is_shut_down:
            return
        self._is_shut_down = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._mark_dead("engine shut down")
        proc = self._proc
        if proc is not None and proc.is_alive():
            with contextlib.suppress(zmq.ZMQError):
                self._push.send(self._codec.encode(ipc.Shutdown()), zmq.NOBLOCK)
            loop = asyncio.get_running_loop()
            for stop in (None, proc.terminate, proc.kill):
                if stop is not None:
                    stop()
                await loop.run_in_executor(None, proc.join, timeout if stop is None else 5.0)
                if not proc.is_alive():
                    break
        if proc is not None and not proc.is_alive():
            proc.close()  # releases its sentinel fd
        if hasattr(self, "_ctx"):
            self._push.close()
            self._pull.close()
            self._ctx.term()
            self._actx.term()
        if self._paths is not None:
            self._paths.cleanup()

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # ---- internals --------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_reason)
        if self.ready is None:
            raise EngineDeadError("engine is not started")

    def _check_fits(self, prompt: ProcessedPrompt, params: SamplingParams) -> None:
        """The scheduler's KV-capacity check, done here so it fails before queueing."""
        assert self.ready is not None and self.input_processor is not None
        check_kv_capacity(
            len(prompt.prompt_token_ids),
            self.input_processor.resolve_max_tokens(prompt, params),
            self.max_model_len,
            self.ready.block_size,
            self.ready.num_blocks - 1,  # the null block is never handed out
        )

    def _send(self, message: msgspec.Struct) -> None:
        self._push.send(self._codec.encode(message), zmq.NOBLOCK)

    def _abort(self, request_id: str) -> None:
        """Forgets the request API-side and aborts its unfinished completions in the core."""
        if self.output_processor is None:
            return
        core_ids = self.output_processor.abort_request(request_id)
        entry = self._requests.get(request_id)
        if entry is not None:
            entry.is_waiting = False
        if core_ids and self._dead_reason is None:
            with contextlib.suppress(zmq.ZMQError):
                self._send(ipc.Abort(request_ids=core_ids))

    def _forget(self, request_id: str) -> None:
        entry = self._requests.pop(request_id, None)
        if entry is not None:
            for core_id in entry.core_ids:
                self._core_to_user.pop(core_id, None)

    def _mark_dead(self, reason: str) -> None:
        """Fails every in-flight request, embed and probe with EngineDeadError(reason)."""
        if self._dead_reason is None:
            self._dead_reason = reason
        for entry in self._requests.values():
            if not entry.finished:
                entry.finished = True
                entry.queue.put_nowait(EngineDeadError(self._dead_reason))
        for fut in [*self._pending.embeds.values(), *self._pending.probes.values()]:
            if not fut.done():
                fut.set_exception(EngineDeadError(self._dead_reason))

    async def _read_loop(self) -> None:
        """The one reader: decodes core messages, feeds queues, and watches the core's life."""
        assert self._proc is not None
        try:
            while True:
                if await self._pull.poll(_POLL_INTERVAL_MS):
                    while True:
                        try:
                            data = await self._pull.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._last_heartbeat = time.monotonic()
                        self._dispatch(self._codec.decode(data))
                if self._dead_reason is not None:
                    return
                if not self._proc.is_alive():
                    self._mark_dead(f"engine core process exited (code {self._proc.exitcode})")
                    return
                if self._requests and self.heartbeat_age > self.hang_timeout_s:
                    self._mark_dead(f"engine core sent no heartbeat for {self.heartbeat_age:.1f} s")
                    self._proc.kill()
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a reader bug must not leave requests hanging
            self._mark_dead(f"engine client reader failed: {e!r}")
            raise

    def _dispatch(self, msg: msgspec.Struct) -> None:
        if isinstance(msg, ipc.Outputs):
            self._on_outputs(msg)
        elif isinstance(msg, ipc.Heartbeat):
            self._stats = msg.stats
        elif isinstance(msg, ipc.ProbeResult):
            fut = self._pending.probes.get(msg.probe_id)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, ipc.EmbedResult):
            efut = self._pending.embeds.get(msg.req_id)
            if efut is not None and not efut.done():
                efut.set_result(msg.embedding)
        elif isinstance(msg, ipc.Error):
            self._on_error(msg)

    def _on_outputs(self, msg: ipc.Outputs) -> None:
        assert self.output_processor is not None
        if msg.scheduler_stats is not None:
            self._stats = msg.scheduler_stats
        processed = self.output_processor.process_outputs(msg.outputs)
        for core_id, stop_str in processed.stopped_by_string.items():
            self._send(ipc.Finish(request_id=core_id, stop_reason=stop_str))
        for out in processed.request_outputs:
            entry = self._requests.get(out.request_id)
            if entry is None or entry.finished:
                continue
            entry.is_waiting = False
            entry.finished = out.finished
            entry.queue.put_nowait(out)

    def _on_error(self, msg: ipc.Error) -> None:
        if msg.fatal:
            self._mark_dead(f"engine core failed: {msg.message}")
            return
        exc: Exception = (
            ValueError(msg.message) if msg.is_invalid_request else RuntimeError(msg.message)
        )
        rid = msg.request_id
        if rid is None:
            return
        for futures in (self._pending.embeds, self._pending.probes):
            fut = futures.get(rid)
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                return
        user_id = self._core_to_user.get(rid)
        entry = self._requests.get(user_id) if user_id is not None else None
        if entry is not None and not entry.finished:
            entry.finished = True
            self._abort(user_id)
            entry.queue.put_nowait(exc)
