"""InFlight: the API process's table of what is in the engine core, and the dispatch into it.

AsyncLLM (engine/async_llm.py) is the request API: it validates, registers here, sends, and
drains its request's queue. This table is the other half: every message from the core
(outputs, heartbeats, probe and embed results, errors) is dispatched into the entries it
belongs to, and a dead core fails them all at once. It never blocks and never awaits; the
CoreSupervisor calls `dispatch` and `on_death` from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from jaxserve.core.outputs import SchedulerStats
from jaxserve.engine import ipc
from jaxserve.engine.client import EngineDeadError
from jaxserve.engine.output_processor import OutputProcessor
from jaxserve.engine.processor import ProcessedPrompt
from jaxserve.outputs import CompletionOutput, RequestOutput, RequestOutputKind
from jaxserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class RequestEntry:
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
    lora: dict[str, asyncio.Future[ipc.LoRAResult]] = field(default_factory=dict)


class InFlight:
    def __init__(
        self, send: Callable[[msgspec.Struct], None], reaches: Callable[[int], bool]
    ) -> None:
        """send: a message to the core; reaches(generation): the core of that generation is
        the one running and can take messages (a new core never sees a dead one's ids)."""
        self._send = send
        self._reaches = reaches
        # set by start(): the detokenizer side (stop strings, n fan-in)
        self.tokenizer: Any = None
        self.output_processor: OutputProcessor | None = None
        # user request id -> its entry, while generate() runs
        self.requests: dict[str, RequestEntry] = {}
        # core request id -> user request id (for per-request core Errors)
        self.core_to_user: dict[str, str] = {}
        self.pending = _Pending()
        # the latest scheduler stats the core sent
        self.stats = SchedulerStats()

    def start(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.output_processor = OutputProcessor(tokenizer)

    @property
    def num_waiting(self) -> int:
        return sum(e.is_waiting for e in self.requests.values())

    def register(self, request_id: str, entry: RequestEntry, params: SamplingParams) -> None:
        """Registers a request whose id check_new_request_id passed against `requests`."""
        assert self.output_processor is not None
        self.requests[request_id] = entry
        for core_id in entry.core_ids:
            self.core_to_user[core_id] = request_id
        self.output_processor.add_request(
            request_id, entry.prompt, params, entry.core_ids, output_kind=RequestOutputKind.DELTA
        )

    def abort(self, request_id: str, *, in_core: bool = True) -> None:
        """Stops detokenizing the request and aborts its unfinished completions in the core."""
        if self.output_processor is None:
            return
        core_ids = self.output_processor.abort_request(request_id)
        entry = self.requests.get(request_id)
        if entry is None:
            return
        entry.is_waiting = False
        if in_core and core_ids and self._reaches(entry.generation):
            with contextlib.suppress(zmq.ZMQError):
                self._send(ipc.Abort(request_ids=core_ids))

    def end_with_abort(self, request_id: str) -> None:
        """abort() plus a last output with finish_reason "abort" for its generate()."""
        entry = self.requests.get(request_id)
        self.abort(request_id)
        if entry is None or entry.finished:
            return
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

    def forget(self, request_id: str, entry: RequestEntry) -> None:
        if self.requests.get(request_id) is entry:
            del self.requests[request_id]
        for core_id in entry.core_ids:
            if self.core_to_user.get(core_id) == request_id:
                del self.core_to_user[core_id]

    def fail_all(self, reason: str) -> None:
        """Fails every in-flight request, embed and probe with EngineDeadError(reason)."""
        for entry in self.requests.values():
            entry.is_waiting = False
            if not entry.finished:
                entry.finished = True
                entry.queue.put_nowait(EngineDeadError(reason))
        pending = self.pending
        for fut in [*pending.embeds.values(), *pending.probes.values(), *pending.lora.values()]:
            if not fut.done():
                fut.set_exception(EngineDeadError(reason))

    # ---- what the supervisor calls --------------------------------------------------------

    def on_death(self, reason: str) -> None:
        """The core died: fail everything that was in it; nothing it knew survives here."""
        self.fail_all(reason)
        # (the failed requests' generate() calls clean up after themselves)
        if self.output_processor is not None:
            self.output_processor = OutputProcessor(self.tokenizer)
        self.core_to_user.clear()
        self.stats = SchedulerStats()

    def dispatch(self, msg: msgspec.Struct) -> None:
        if isinstance(msg, ipc.Outputs):
            self._on_outputs(msg)
        elif isinstance(msg, ipc.Heartbeat):
            self.stats = msg.stats
        elif isinstance(msg, ipc.ProbeResult):
            fut = self.pending.probes.get(msg.probe_id)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, ipc.EmbedResult):
            efut = self.pending.embeds.get(msg.req_id)
            if efut is not None and not efut.done():
                efut.set_result(msg.embedding)
        elif isinstance(msg, ipc.LoRAResult):
            lfut = self.pending.lora.get(msg.req_id)
            if lfut is not None and not lfut.done():
                lfut.set_result(msg)
        elif isinstance(msg, ipc.Error):
            self._on_error(msg)

    def _on_outputs(self, msg: ipc.Outputs) -> None:
        assert self.output_processor is not None
        if msg.scheduler_stats is not None:
            self.stats = msg.scheduler_stats
        processed = self.output_processor.process_outputs(msg.outputs)
        for core_id, stop_str in processed.stopped_by_string.items():
            self._send(ipc.Finish(request_id=core_id, stop_reason=stop_str))
        for out in processed.request_outputs:
            entry = self.requests.get(out.request_id)
            if entry is None or entry.finished:
                continue
            entry.is_waiting = False
            entry.finished = out.finished
            entry.queue.put_nowait(out)

    def _on_error(self, msg: ipc.Error) -> None:
        """A per-request Error (fatal ones end the core); ValueError when the request was bad."""
        if msg.traceback:
            logger.error("engine core error: %s\n%s", msg.message, msg.traceback.rstrip())
        exc: Exception = (
            ValueError(msg.message) if msg.is_invalid_request else RuntimeError(msg.message)
        )
        rid = msg.request_id
        if rid is None:
            return
        for futures in (self.pending.embeds, self.pending.probes, self.pending.lora):
            fut = futures.get(rid)
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                return
        user_id = self.core_to_user.get(rid)
        entry = self.requests.get(user_id) if user_id is not None else None
        if entry is not None and not entry.finished:
            self.abort(user_id)  # its siblings (n > 1) too
            entry.finished = True
            entry.queue.put_nowait(exc)
