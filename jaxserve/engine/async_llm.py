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
from typing import Any

import msgspec

from jaxserve.config import EngineArgs
from jaxserve.core.admission import check_embed_len, check_new_request_id
from jaxserve.core.outputs import SchedulerStats
from jaxserve.engine import ipc
from jaxserve.engine.client import EngineClient, EngineDeadError, EngineOverloadedError
from jaxserve.engine.core_supervisor import CoreSupervisor
from jaxserve.engine.inflight import InFlight, RequestEntry
from jaxserve.engine.processor import InputProcessor, ProcessedPrompt, PromptType
from jaxserve.lora.request import LoRARequest
from jaxserve.model.loader import load_tokenizer
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams, as_token_ids

logger = logging.getLogger(__name__)

# Restarts allowed within CORE_RESTART_WINDOW_S before the engine gives up (the CLI's
# --max-core-restarts default).
DEFAULT_MAX_CORE_RESTARTS = 5
CORE_RESTART_WINDOW_S = 600.0


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
            on_message=lambda msg: self._inflight.dispatch(msg),
            on_death=lambda reason: self._inflight.on_death(reason),
            has_work=lambda: bool(self._inflight.requests),
            hang_timeout_s=hang_timeout_s,
            max_restarts=max_core_restarts,
            restart_window_s=core_restart_window_s,
        )
        self.max_model_len = 0
        self.tokenizer: Any = None
        self.ready: ipc.Ready | None = None
        self.input_processor: InputProcessor | None = None
        # set on shutdown
        self._shut_down_reason: str | None = None
        # what is in the core: requests, embeds, probes (and the dispatch of its messages)
        self._inflight = InFlight(self._send, self._reaches)
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
        self.max_model_len = r.limits.max_model_len
        self.input_processor = InputProcessor(
            self.tokenizer, limits=r.limits, eos_token_id=r.eos_token_id, seed=self.args.seed
        )
        self._inflight.start(self.tokenizer)
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
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """See EngineClient.generate. Every check runs before the first AddRequest is sent.

        NOTE: from registration on, everything is inside one try/finally: whatever ends the
        request (a refusal by the core, an error, the consumer leaving, the core dying), it
        leaves nothing registered and frees its blocks in the core.
        """
        self._check_alive()
        assert self.input_processor is not None
        inflight = self._inflight
        processed = (
            prompt
            if isinstance(prompt, ProcessedPrompt)
            else self.input_processor.process_prompt(prompt)
        )
        check_new_request_id(request_id, inflight.requests)
        num_waiting = inflight.num_waiting
        if num_waiting >= self.max_waiting_requests:
            raise EngineOverloadedError(
                f"{num_waiting} requests are waiting (max_waiting_requests="
                f"{self.max_waiting_requests}); retry later"
            )
        requests = self.input_processor.make_requests(
            request_id,
            processed,
            params,
            priority=priority,
            cache_salt=cache_salt,
            lora_request=lora_request,
        )
        # Encoded up front: what the wire cannot carry (a lone surrogate, an int past 64
        # bits) is a ValueError naming the field, before anything is registered.
        messages = [ipc.encode_request(self._codec, r) for r in requests]
        core_ids = [r.request_id for r in requests]
        entry = RequestEntry(asyncio.Queue(), processed, core_ids, self._supervisor.generation)
        try:
            inflight.register(request_id, entry, params)
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
            inflight.abort(request_id, in_core=not entry.finished)
            entry.finished = True
            inflight.forget(request_id, entry)

    async def abort(self, request_id: str) -> None:
        """Ends the request in the core; its generate() ends with finish_reason "abort"."""
        self._inflight.end_with_abort(request_id)

    async def embed(self, prompt_token_ids: list[int]) -> list[float]:
        """Mean-pooled final hidden state, L2-normalized (see runner/embedder.py)."""
        self._check_alive()
        assert self.ready is not None
        check_embed_len(len(prompt_token_ids), self.max_model_len, "prompt_token_ids")
        ids = as_token_ids(prompt_token_ids, self.ready.limits.vocab_size, "prompt_token_ids")
        req_id = f"embed-{next(self._ids)}"
        fut: asyncio.Future[list[float]] = asyncio.get_running_loop().create_future()
        self._inflight.pending.embeds[req_id] = fut
        try:
            self._send(ipc.Embed(req_id=req_id, token_ids=ids))
            return await fut
        finally:
            self._inflight.pending.embeds.pop(req_id, None)

    @property
    def lora_enabled(self) -> bool:  # type: ignore[override]
        return self.ready is not None and self.ready.limits.enable_lora

    async def _lora_control(self, op: str, **fields: object) -> list[LoRARequest]:
        self._check_alive()
        req_id = f"lora-{next(self._ids)}"
        fut: asyncio.Future[ipc.LoRAResult] = asyncio.get_running_loop().create_future()
        self._inflight.pending.lora[req_id] = fut
        try:
            self._send(ipc.LoRAControl(req_id=req_id, op=op, **fields))  # type: ignore[arg-type]
            return (await fut).loras
        finally:
            self._inflight.pending.lora.pop(req_id, None)

    async def add_lora(self, lora_request: LoRARequest) -> None:
        """See EngineClient.add_lora: read and checked in the engine core."""
        if not self.lora_enabled:
            await super().add_lora(lora_request)
        await self._lora_control("add", lora_request=lora_request)

    async def remove_lora(self, lora_int_id: int) -> None:
        if not self.lora_enabled:
            await super().remove_lora(lora_int_id)
        await self._lora_control("remove", lora_int_id=lora_int_id)

    async def list_loras(self) -> list[LoRARequest]:
        return await self._lora_control("list") if self.lora_enabled else []

    async def check_health(self, timeout: float) -> None:
        """Raises EngineDeadError (dead or restarting core), TimeoutError, or RuntimeError
        (the probe failed)."""
        self._check_alive()
        probe_id = f"probe-{next(self._ids)}"
        fut: asyncio.Future[ipc.ProbeResult] = asyncio.get_running_loop().create_future()
        self._inflight.pending.probes[probe_id] = fut
        try:
            self._send(ipc.HealthProbe(probe_id=probe_id))
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise TimeoutError(f"health probe got no token within {timeout} s") from None
        finally:
            self._inflight.pending.probes.pop(probe_id, None)

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
        return dataclasses.replace(self._inflight.stats, num_core_restarts=self.num_core_restarts)

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
        self._inflight.fail_all(self._shut_down_reason)
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

    def _send(self, message: msgspec.Struct) -> None:
        self._supervisor.send(self._codec.encode(message))

    def _reaches(self, generation: int) -> bool:
        """The core of that generation is the one running and takes messages."""
        return generation == self._supervisor.generation and self.unavailable_reason is None
