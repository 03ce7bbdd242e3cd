"""The engine-core process: EngineCore in a busy loop behind two zmq sockets (vLLM V1 layout).

AsyncLLM starts `run_engine_core` with multiprocessing's "spawn" context (a fresh interpreter:
no forked JAX runtime, no inherited event loop). The process builds EngineCore (weights,
warmup), sends Ready, then loops: drain the input socket (without blocking while there is
work, blocking up to HEARTBEAT_INTERVAL_S when idle), run one core.step(), send its Outputs,
run at most one slice of a queued embedding (engine/embed_queue.py), and send a Heartbeat at
least every HEARTBEAT_INTERVAL_S. It exits 0 on Shutdown or when its parent dies, and non-zero
after a fatal error (which it reports first as a fatal Error).

NOTE on health probes: a probe is a real one-token greedy generation (prompt: one token), added
to the scheduler as an *urgent* request: at the front of the waiting queue, and allowed into
one sequence seat that user requests may not take (`SchedulerConfig.num_reserved_seqs`). We
reserve a seat rather than let the probe exceed max_num_seqs because the request bucket R is
capped at max_num_seqs (a power of two by default), so a 65th row would need a larger compiled
program.
The price is one seat of max_num_seqs for users (none when max_num_seqs == 1: then a probe may
wait for a seat). A probe still shares the step's token budget and the KV blocks, so under a
prefill chunk that takes the whole budget it waits one step.

NOTE on errors: a bad message or a request the scheduler refuses gets an Error naming that
request and the loop goes on; so does a request that fails alone inside a step (its staging
raised: core.step() ends it with an error output, sent here as its Error). An exception out
of core.step() is a device-side failure and fatal: the KV cache was donated to the failed
call, so no request's state can be trusted; the core reports it (a short message, and the
traceback for the API process's log) and exits 1. The API side fails every in-flight request
with EngineDeadError (an honest 503 beats silently wrong tokens) and starts a new core.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback

import msgspec
import zmq

from jaxserve import distributed
from jaxserve.config import EngineArgs
from jaxserve.core.admission import PROBE_ID_PREFIX, EngineCoreRequest
from jaxserve.core.outputs import EngineCoreOutputs
from jaxserve.engine import ipc
from jaxserve.engine.core_interface import EngineCoreInterface
from jaxserve.engine.dp import make_engine_core
from jaxserve.engine.embed_queue import EmbedQueue
from jaxserve.engine.gc_heap import freeze_startup_heap
from jaxserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_PROBE_PARAMS = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


def run_engine_core(args: EngineArgs, paths: ipc.IpcPaths, parent_pid: int) -> None:
    """The process entry point (must be importable for "spawn"); never returns normally."""
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="engine-core %(levelname)s %(message)s")
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.connect(paths.to_core)
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.SNDHWM, 0)  # never block (or drop) an output: memory is the bound
    out.setsockopt(zmq.LINGER, 2000)  # flush a last Error on exit, but never hang on it
    out.connect(paths.from_core)
    codec = ipc.core_codec()
    try:
        # multi-host: the API process exported JAX_* variables; start jax.distributed first
        group = distributed.initialize()
        # one seat for health probes (see the module NOTE); none to spare with one seat
        probe_seats = 1 if args.max_num_seqs > 1 else 0
        core = make_engine_core(args, show_progress=False, num_reserved_seqs=probe_seats)
        # inside the try too: building the loop warms the embedder up (it compiles)
        proc = EngineCoreProc(core, inp, out, codec, parent_pid)
    except BaseException as e:  # noqa: BLE001 - start-up failures of any kind are reported
        msg = f"engine core failed to start: {type(e).__name__}: {e}"
        error = ipc.Error(message=msg, fatal=True, traceback=traceback.format_exc())
        out.send(codec.encode(error))
        _close(ctx, inp, out)
        sys.exit(1)
    rc = proc.run()
    # frees the device memory now; multi-host: releases the followers from their loop (and
    # lets jax.distributed's shutdown barrier at exit complete)
    core.close()
    group.shutdown()
    _close(ctx, inp, out)
    if proc.is_orphaned:
        paths.cleanup()  # the parent died without its shutdown(); nobody else will
    sys.exit(rc)


def _close(ctx: zmq.Context, *sockets: zmq.Socket) -> None:
    for s in sockets:
        s.close()
    ctx.term()


class EngineCoreProc:
    """The loop around one EngineCore; owns the probe and embedding side-paths."""

    def __init__(
        self,
        core: EngineCoreInterface,
        inp: zmq.Socket,
        out: zmq.Socket,
        codec: ipc.Codec,
        parent_pid: int,
    ) -> None:
        self.core = core
        self.inp = inp
        self.out = out
        self.codec = codec
        self.parent_pid = parent_pid
        # probe request id -> (probe_id, arrival time); one per replica and probe
        self._probes: dict[str, tuple[str, float]] = {}
        # probe_id -> replicas that have not answered yet (a probe passes when all have)
        self._probe_waiting: dict[str, int] = {}
        # embeddings, run a slice per loop turn (compiled here when the core was warmed up)
        self._embeds = EmbedQueue(core)
        self._last_heartbeat = 0.0
        # set when the loop ended because the parent process died
        self.is_orphaned = False
        self._ready = ipc.Ready(
            limits=core.limits,
            eos_token_id=core.spec.eos_token_id,
            startup_seconds=core.startup_seconds,
            warmup_seconds=core.warmup_seconds + self._embeds.warmup_seconds,
        )

    def send(self, message: msgspec.Struct) -> None:
        self.out.send(self.codec.encode(message))

    def run(self) -> int:
        """The busy loop; returns the exit code."""
        freeze_startup_heap()  # the engine is built and warmed up: its heap stays
        self.send(self._ready)
        while True:
            is_busy = self.core.has_unfinished_requests() or self._embeds.has_work
            # Idle: block on the socket, but wake up in time for the next heartbeat.
            if self.inp.poll(0 if is_busy else int(ipc.HEARTBEAT_INTERVAL_S * 1000)):
                if self._drain_input():
                    return 0
            if self.core.has_unfinished_requests():
                try:
                    outputs = self.core.step()
                except Exception as e:  # noqa: BLE001 - see the module NOTE on errors
                    # the type only: a device error's text can hold paths; all of it is in
                    # the traceback, which the API process logs
                    message = f"engine step failed on the device ({type(e).__name__})"
                    tb = traceback.format_exc()
                    self.send(ipc.Error(message=message, fatal=True, traceback=tb))
                    return 1
                self._send_outputs(outputs)
            if (reply := self._embeds.run_slice()) is not None:  # at most one bounded slice
                self.send(reply)
            now = time.monotonic()
            if now - self._last_heartbeat >= ipc.HEARTBEAT_INTERVAL_S:
                if os.getppid() != self.parent_pid:
                    self.is_orphaned = True  # nobody reads our outputs any more
                    return 0
                self._send_heartbeat(now)

    def _drain_input(self) -> bool:
        """Handles every queued message; True on Shutdown."""
        while True:
            try:
                data = self.inp.recv(zmq.NOBLOCK)
            except zmq.Again:
                return False
            try:
                message = self.codec.decode(data)
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                # Name the request when the bytes are at least a msgpack map with an id, so
                # the API side can fail that request instead of leaving it waiting.
                self.send(
                    ipc.Error(
                        message=f"bad message: {e}",
                        request_id=_salvage_id(data),
                        is_invalid_request=True,
                    )
                )
                continue
            if isinstance(message, ipc.Shutdown):
                return True
            self._handle(message)

    def _handle(self, message: msgspec.Struct) -> None:
        """One message; a failure becomes an Error for that request, never a dead loop."""
        request_id: str | None = None
        try:
            if isinstance(message, EngineCoreRequest):
                request_id = message.request_id
                self.core.add_request(message)
            elif isinstance(message, ipc.Abort):
                self.core.abort_requests(message.request_ids)
            elif isinstance(message, ipc.Finish):
                self.core.finish_requests([message.request_id], message.stop_reason)
            elif isinstance(message, ipc.HealthProbe):
                request_id = message.probe_id
                self._add_probe(message.probe_id)
            elif isinstance(message, ipc.Embed):
                request_id = message.req_id
                self._embed(message)
            elif isinstance(message, ipc.LoRAControl):
                request_id = message.req_id
                self._lora_control(message)
        except ValueError as e:
            self.send(ipc.Error(message=str(e), request_id=request_id, is_invalid_request=True))
        except Exception as e:  # noqa: BLE001 - one request never kills the loop
            logger.exception("handling %s failed", type(message).__name__)
            self.send(ipc.Error(message=f"{type(e).__name__}: {e}", request_id=request_id))

    def _add_probe(self, probe_id: str) -> None:
        """One probe request per replica: healthy means every replica generates a token."""
        # Any in-vocabulary token will do; the eos token (or 0) is always one.
        token = self.core.spec.eos_token_id or 0
        for replica in range(self.core.num_replicas):
            core_id = f"{PROBE_ID_PREFIX}{probe_id}#{replica}"
            request = EngineCoreRequest(
                request_id=core_id,
                prompt_token_ids=[token],
                sampling_params=_PROBE_PARAMS,
                eos_token_id=None,
                sampling_seed=0,
                priority=-(1 << 62),  # first under the "priority" policy too (a probe may)
                max_tokens=1,
            )
            self.core.add_request(request, urgent=True, replica=replica)
            self._probes[core_id] = (probe_id, time.monotonic())
        self._probe_waiting[probe_id] = self.core.num_replicas

    def _lora_control(self, message: ipc.LoRAControl) -> None:
        if message.op == "add":
            if message.lora_request is None:
                raise ValueError("lora_request is required to add an adapter")
            self.core.add_lora(message.lora_request)
        elif message.op == "remove":
            self.core.remove_lora(message.lora_int_id)
        elif message.op != "list":
            raise ValueError(f"unknown LoRA operation {message.op!r}")
        self.send(ipc.LoRAResult(req_id=message.req_id, loras=self.core.list_loras()))

    def _embed(self, message: ipc.Embed) -> None:
        """Queues it; the loop runs it a slice per turn (engine/embed_queue.py)."""
        self._embeds.add(message.req_id, message.token_ids)

    def _send_outputs(self, outputs: EngineCoreOutputs) -> None:
        user_outputs = []
        for o in outputs.outputs:
            probe = self._probes.pop(o.request_id, None) if self._probes else None
            if o.error is not None:
                # failed alone in a step (see EngineCore.step): an Error for it instead
                rid = probe[0] if probe is not None else o.request_id
                if probe is not None:
                    self._probe_waiting.pop(probe[0], None)
                self.send(ipc.Error(message=o.error, request_id=rid, is_invalid_request=True))
                continue
            if probe is None:
                user_outputs.append(o)
                continue
            probe_id, arrival = probe
            if probe_id not in self._probe_waiting:
                continue  # another replica's probe of it failed: its Error is out already
            self._probe_waiting[probe_id] -= 1
            if self._probe_waiting[probe_id] > 0:
                continue
            del self._probe_waiting[probe_id]
            latency = time.monotonic() - arrival  # of the last replica to answer
            token = o.new_token_ids[0] if o.new_token_ids else -1
            self.send(ipc.ProbeResult(probe_id=probe_id, token_id=token, latency_s=latency))
        if user_outputs or outputs.scheduler_stats is not None:
            self.send(ipc.Outputs(outputs=user_outputs, scheduler_stats=outputs.scheduler_stats))

    def _send_heartbeat(self, now: float) -> None:
        schedulers = self.core.schedulers
        self.send(
            ipc.Heartbeat(
                time=time.time(),
                num_running=sum(len(s.running) for s in schedulers),
                num_waiting=sum(len(s.waiting) for s in schedulers),
                stats=self.core.make_stats(),
            )
        )
        self._last_heartbeat = now


def _salvage_id(data: bytes) -> str | None:
    """The request_id / req_id / probe_id of an off-schema message, if it has one."""
    try:
        raw = msgspec.msgpack.decode(data)  # untyped: plain dicts, lists and scalars only
    except msgspec.DecodeError:
        return None
    if isinstance(raw, dict):
        for key in ("request_id", "req_id", "probe_id"):
            if isinstance(raw.get(key), str):
                return raw[key]
    return None
