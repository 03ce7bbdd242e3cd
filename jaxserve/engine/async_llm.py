"""AsyncLLM: the EngineClient the API server uses, with the engine core in its own process.

The API process owns the tokenizer, the InputProcessor (validation, n fan-out, seeds) and the
OutputProcessor (incremental detokenization, stop strings, n fan-in); the engine-core process
(core_proc.py) sees only token ids. One background supervisor task decodes every core message
and feeds per-request asyncio.Queues; generate() only validates, sends and drains its queue.

NOTE on liveness: the supervisor polls the core's socket every 100 ms and checks the process
each time (`Process.is_alive`, a non-blocking waitpid), so a crashed or killed core is seen
within ~0.1 s. A core that is alive but stops sending heartbeats (a hang) is declared dead
after `hang_timeout_s` while requests are pending, and killed. That timeout is generous by
default because heartbeats come from the loop itself and a step that compiles a new bucket
(warmup off, or a model much larger than this machine likes) legitimately runs for many
seconds; `heartbeat_age` exposes the raw signal meanwhile.

NOTE on restarts: a dead core (exit, kill -9, a fatal device error, a hang) is logged at
ERROR with its traceback (the API process's log only; clients and /health get a short
reason), every in-flight request, embed and probe fails with EngineDeadError (the server's
503 + Retry-After), and a new core is started (its weights come from the orbax copy and its
programs from the persistent compile cache, so seconds). Meanwhile `unavailable_reason` says
why and new requests fail the same way; `dead_reason` stays None, since the process heals
itself (a liveness probe should not kill it). Past `max_core_restarts` within
`core_restart_window_s` it gives up: `dead_reason` is set and `wait_dead()` returns, and the
server exits non-zero.

The core is started with multiprocessing's "spawn", so a script that creates an AsyncLLM at
import time needs the usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from jaxserve.config import EngineArgs
from jaxserve.core.kv_cache_manager import check_kv_capacity
from jaxserve.core.outputs import SchedulerStats
from jaxserve.engine import ipc
from jaxserve.engine.client import EngineClient, EngineDeadError, EngineOverloadedError
from jaxserve.engine.core_proc import PROBE_ID_PREFIX
from jaxserve.engine.core_supervisor import CoreSupervisor
from jaxserve.engine.output_processor import OutputProcessor
from jaxserve.engine.processor import InputProcessor, ProcessedPrompt, PromptType
from jaxserve.model.loader import load_tokenizer
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import SamplingParams, as_token_ids

logger = logging.getLogger(__name__)

# Restarts allowed within CORE_RESTART_WINDOW_S before the engine gives up (the CLI's
# --max-core-restarts default).
DEFAULT_MAX_CORE_RESTARTS = 5
CORE_RESTART_WINDOW_S = 600.0


@dataclass
class _RequestEntry:
    """The API-side state of one user request being streamed by generate()."""

    # RequestOutput deltas, or the exception to raise in the consumer
    queue: asyncio.Queue[RequestOutput | BaseException]
    prompt: ProcessedPrompt
    # the core request ids of its completions (n of them)
    core_ids: list[str]
    # which core process it was sent to (CoreSupervisor.generation at the time)
    generation: int
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
        max_core_restarts: int = DEFAULT_MAX_CORE_RESTARTS,
        core_restart_window_s: float = CORE_RESTART_WINDOW_S,
    ) -> None:
        """Only records settings; `start()` (or `create()`) spawns the core.

        max_core_restarts: restarts of a dead core allowed within core_restart_window_s
        seconds (0: the first death is final).
        """
        self.args = args
        self.model_name = served_model_name or args.model
        # user requests not yet producing output at which generate() raises EngineOverloaded
        self.max_waiting_requests = max_waiting_requests
        self._supervisor = CoreSupervisor(
            args,
            on_message=self._dispatch,
            on_death=self._on_death,
            has_work=lambda: bool(self._requests),
            hang_timeout_s=hang_timeout_s,
            max_restarts=max_core_restarts,
            restart_window_s=core_restart_window_s,
        )
        self.max_model_len = 0
        self.tokenizer: Any = None
        self.ready: ipc.Ready | None = None
        self.input_processor: InputProcessor | None = None
        self.output_processor: OutputProcessor | None = None
        # set on shutdown
        self._shut_down_reason: str | None = None
        self._stats = SchedulerStats()
        self._requests: dict[str, _RequestEntry] = {}
        # core request id -> user request id (for per-request core Errors)
        self._core_to_user: dict[str, str] = {}
        self._pending = _Pending()
        self._ids = itertools.count()
        self._codec = ipc.client_codec()
        self._supervisor_task: asyncio.Task[None] | None = None

    @classmethod
    async def create(
        cls,
        args: EngineArgs,
        *,
        max_waiting_requests: int = 1024,
        served_model_name: str | None = None,
        hang_timeout_s: float = 60.0,
        startup_timeout_s: float = 1800.0,
        max_core_restarts: int = DEFAULT_MAX_CORE_RESTARTS,
        core_restart_window_s: float = CORE_RESTART_WINDOW_S,
    ) -> AsyncLLM:
        llm = cls(
            args,
            max_waiting_requests=max_waiting_requests,
            served_model_name=served_model_name,
            hang_timeout_s=hang_timeout_s,
            max_core_restarts=max_core_restarts,
            core_restart_window_s=core_restart_window_s,
        )
        await llm.start(startup_timeout_s=startup_timeout_s)
        return llm

    async def start(self, *, startup_timeout_s: float = 1800.0) -> None:
        """Spawns the core, loads the tokenizer meanwhile, and waits for Ready.

        Raises RuntimeError with the core's own error when its start-up fails.
        """
        loop = asyncio.get_running_loop()
        start = asyncio.ensure_future(self._supervisor.start(startup_timeout_s))
        # The tokenizer loads while the core loads weights; the core's own error (e.g. a bad
        # model path) is the one reported, so it is awaited first.
        tokenizer_name = self.args.tokenizer or self.args.model
        tokenizer_future = loop.run_in_executor(None, load_tokenizer, tokenizer_name)
        try:
            self.ready = await start
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
        self._supervisor_task = asyncio.create_task(
            self._supervisor.run(), name="jaxserve-core-supervisor"
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
        """See EngineClient.generate. Every check runs before the first AddRequest is sent.

        NOTE: from registration on, everything is inside one try/finally: whatever ends the
        request (a refusal by the core, an error, the consumer leaving, the core dying), it
        leaves nothing registered and frees its blocks in the core.
        """
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
        # Encoded up front: what the wire cannot carry (a lone surrogate, an int past 64
        # bits) is a ValueError naming the field, before anything is registered.
        messages = [
            self._encode_request(
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
            for r in requests
        ]
        core_ids = [r.request_id for r in requests]
        entry = _RequestEntry(asyncio.Queue(), processed, core_ids, self._supervisor.generation)
        try:
            self._requests[request_id] = entry
            for core_id in core_ids:
                self._core_to_user[core_id] = request_id
            self.output_processor.add_request(request_id, processed, params, core_ids, stream=True)
            for data in messages:
                self._supervisor.send(data)
            while True:
                item = await entry.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            # A consumer that stopped early (disconnect: GeneratorExit / CancelledError), an
            # error, a refusal: forget the request, and free its blocks in the core (at its
            # next loop turn) unless the core ended it already.
            self._abort(request_id, in_core=not entry.finished)
            entry.finished = True
            self._forget(request_id, entry)

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
        """Raises EngineDeadError (dead or restarting core), TimeoutError, or RuntimeError
        (the probe failed)."""
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
        return self.ready is not None and self.unavailable_reason is None

    @property
    def dead_reason(self) -> str | None:
        """Set only when the engine is gone for good (shut down, or restarts spent)."""
        return self._shut_down_reason or self._supervisor.gave_up_reason

    @property
    def unavailable_reason(self) -> str | None:
        dead = self.dead_reason
        if dead is not None:
            return dead
        if self._supervisor.restarting is not None:
            return self._supervisor.restarting
        if self.ready is None:
            return "the engine is not started"
        return None

    async def wait_dead(self) -> str:
        """Returns the reason once the engine has given up restarting its core."""
        await self._supervisor.gave_up.wait()
        assert self._supervisor.gave_up_reason is not None
        return self._supervisor.gave_up_reason

    @property
    def heartbeat_age(self) -> float:
        """Seconds since the last message from the core (heartbeat or outputs), API clock."""
        return time.monotonic() - self._supervisor.last_message_time

    @property
    def stats(self) -> SchedulerStats:
        return dataclasses.replace(self._stats, num_core_restarts=self.num_core_restarts)

    @property
    def num_core_restarts(self) -> int:
        """Engine-core processes started after the first (exported in /metrics)."""
        return self._supervisor.num_restarts

    @property
    def core_pid(self) -> int | None:
        """The current engine-core process id (for tests and process supervisors)."""
        return self._supervisor.pid

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Shutdown message, join (then SIGTERM, SIGKILL), close sockets, remove the temp dir.

        Idempotent; in-flight requests fail with EngineDeadError("engine shut down").
        """
        if self._shut_down_reason is not None:
            return
        self._shut_down_reason = self._supervisor.gave_up_reason or "engine shut down"
        if self._supervisor_task is not None:
            self._supervisor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor_task
        self._fail_in_flight(self._shut_down_reason)
        await self._supervisor.stop(timeout, self._codec.encode(ipc.Shutdown()))

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # ---- internals --------------------------------------------------------------------

    def _check_alive(self) -> None:
        reason = self.unavailable_reason
        if reason is not None:
            raise EngineDeadError(reason)

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

    def _encode_request(self, message: ipc.AddRequest) -> bytes:
        """The message's bytes; ValueError naming the field the wire cannot carry."""
        try:
            return self._codec.encode(message)
        except (msgspec.EncodeError, OverflowError, UnicodeEncodeError, TypeError) as e:
            name = _unencodable_field(message)
            if isinstance(e, UnicodeEncodeError):
                why = "must be valid unicode text (no lone surrogates)"
            else:
                why = f"cannot be sent to the engine ({e})"
            raise ValueError(f"{name} {why}") from None

    def _send(self, message: msgspec.Struct) -> None:
        self._supervisor.send(self._codec.encode(message))

    def _abort(self, request_id: str, *, in_core: bool = True) -> None:
        """Forgets the request API-side and aborts its unfinished completions in the core
        (only in the core it was sent to: a new core never sees a dead one's ids)."""
        if self.output_processor is None:
            return
        core_ids = self.output_processor.abort_request(request_id)
        entry = self._requests.get(request_id)
        if entry is None:
            return
        entry.is_waiting = False
        if (
            in_core
            and core_ids
            and entry.generation == self._supervisor.generation
            and self.unavailable_reason is None
        ):
            with contextlib.suppress(zmq.ZMQError):
                self._send(ipc.Abort(request_ids=core_ids))

    def _forget(self, request_id: str, entry: _RequestEntry) -> None:
        if self._requests.get(request_id) is entry:
            del self._requests[request_id]
        for core_id in entry.core_ids:
            if self._core_to_user.get(core_id) == request_id:
                del self._core_to_user[core_id]

    def _fail_in_flight(self, reason: str) -> None:
        """Fails every in-flight request, embed and probe with EngineDeadError(reason)."""
        for entry in self._requests.values():
            entry.is_waiting = False
            if not entry.finished:
                entry.finished = True
                entry.queue.put_nowait(EngineDeadError(reason))
        for fut in [*self._pending.embeds.values(), *self._pending.probes.values()]:
            if not fut.done():
                fut.set_exception(EngineDeadError(reason))

    # ---- what the supervisor calls --------------------------------------------------------

    def _on_death(self, reason: str) -> None:
        """The core died: fail everything that was in it; nothing it knew survives here."""
        self._fail_in_flight(reason)
        # (the failed requests' generate() calls clean up after themselves)
        if self.output_processor is not None:
            self.output_processor = OutputProcessor(self.tokenizer)
        self._core_to_user.clear()
        self._stats = SchedulerStats()

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
        """A per-request Error (fatal ones end _watch); ValueError when the request was bad."""
        if msg.traceback:
            logger.error("engine core error: %s\n%s", msg.message, msg.traceback.rstrip())
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
            self._abort(user_id)  # its siblings (n > 1) too
            entry.finished = True
            entry.queue.put_nowait(exc)


def _unencodable_field(message: ipc.AddRequest) -> str:
    """The name (as a client sends it) of the first field msgpack cannot encode."""
    encoder = msgspec.msgpack.Encoder()
    for name in message.__struct_fields__:
        value = getattr(message, name)
        try:
            encoder.encode(value)
            continue
        except Exception:  # noqa: BLE001 - any failure names this field
            pass
        if name != "params":
            return name
        for f in dataclasses.fields(value):
            try:
                encoder.encode(getattr(value, f.name))
            except Exception:  # noqa: BLE001
                return f.name
        return "sampling_params"
    return "request"
