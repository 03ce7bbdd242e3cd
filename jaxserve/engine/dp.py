"""Data parallel: several independent engine replicas, each on its own slice of the devices.

`DPEngineCore` has EngineCore's interface (add_request, step, abort_requests, ...), so the
offline LLMEngine and the engine-core process drive one replica or many the same way. Replica
i owns devices [i * tp, (i + 1) * tp) of `jax.devices()`, where tp is tensor_parallel_size: its
own weights, its own KV cache, its own scheduler. Nothing is shared at step time, so replicas
never synchronise with each other; the weights are read from disk once and placed on every
slice. A new request is routed by `jaxserve.core.router` (most KV blocks left after admitting
it, prefix-cache hits counted as saved blocks) and stays on its replica until it ends.

NOTE: the replicas of one DPEngineCore step one after another in one Python thread. Each
step dispatches asynchronously to its own devices, so on accelerators the devices overlap
while the host prepares the next replica's step; the host work (scheduling, staging inputs)
is serial. That is the price of one process behind the API server; replicas in separate
processes would scale the host side too, and are left for when a host becomes the bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import jax

from jaxserve.config import EngineArgs
from jaxserve.core.admission import EngineCoreRequest, RequestLimits, check_new_request_id
from jaxserve.core.outputs import EngineCoreOutputs, SchedulerStats
from jaxserve.core.router import pick_replica, replica_load
from jaxserve.core.scheduler import Scheduler
from jaxserve.engine.core import EngineCore
from jaxserve.engine.core_interface import EngineCoreInterface
from jaxserve.lora.request import LoRARequest
from jaxserve.model import sharding
from jaxserve.model.loader import load_model, resolve_dtype


def replica_device_slices(
    data_parallel_size: int, tensor_parallel_size: int, devices: Sequence[Any] | None = None
) -> list[list[Any]]:
    """Disjoint, contiguous device slices, one per replica (contiguous: on a GPU node or a
    TPU slice, neighbouring device ids share the fastest links, which TP wants)."""
    devices = list(jax.devices() if devices is None else devices)
    need = data_parallel_size * tensor_parallel_size
    if need > len(devices):
        raise ValueError(
            f"data_parallel_size={data_parallel_size} x tensor_parallel_size="
            f"{tensor_parallel_size} needs {need} devices, but {len(devices)} "
            f"{devices[0].platform if devices else ''} device(s) are visible"
        )
    tp = tensor_parallel_size
    return [devices[i * tp : (i + 1) * tp] for i in range(data_parallel_size)]


def merge_stats(stats: Sequence[SchedulerStats]) -> SchedulerStats:
    """One SchedulerStats for all replicas: counts add up, usage is over all their blocks."""
    total = SchedulerStats()
    for s in stats:
        for f in dataclasses.fields(SchedulerStats):
            if f.name in ("kv_cache_usage", "requests_per_replica"):
                continue
            value = getattr(s, f.name)
            if isinstance(value, dict):  # per LoRA adapter: summed by name
                merged = getattr(total, f.name)
                for k, v in value.items():
                    merged[k] = merged.get(k, 0) + v
            else:
                setattr(total, f.name, getattr(total, f.name) + value)
    usable = sum(s.num_total_blocks for s in stats)
    total.kv_cache_usage = total.num_used_blocks / usable if usable else 0.0
    return total


class DPEngineCore:
    """data_parallel_size EngineCores behind one interface (engine/core_interface.py)."""

    def __init__(
        self,
        args: EngineArgs,
        *,
        show_progress: bool = True,
        devices: Sequence[jax.Device] | None = None,
        num_reserved_seqs: int = 0,
    ) -> None:
        """devices: the pool to slice (default: every visible device)."""
        if jax.process_count() > 1:
            raise ValueError(
                "data_parallel_size > 1 across several processes (multi-host) is not supported; "
                "run one server per host group instead"
            )
        tp = args.tensor_parallel_size
        slices = replica_device_slices(args.data_parallel_size, tp, devices)
        # Read from disk once, straight onto replica 0's slice (sharded over its mesh under
        # TP, so no device ever holds the whole model); every other replica's runner copies
        # it shard by shard onto its own slice, and this reference dies with __init__.
        mesh = sharding.make_mesh(tp, slices[0]) if tp > 1 else None
        loaded = load_model(
            args.model, resolve_dtype(args.dtype), mesh=mesh, load_format=args.load_format
        )
        self.replicas: list[EngineCore] = [
            EngineCore(
                args,
                loaded=loaded,
                show_progress=show_progress,
                devices=devices,
                num_reserved_seqs=num_reserved_seqs,
            )
            for devices in slices
        ]
        # request id -> index of the replica that owns it, until it finishes or is aborted
        self._owner: dict[str, int] = {}
        # requests routed to each replica so far (for metrics, notebooks and tests)
        self.requests_per_replica = [0] * len(self.replicas)
        self.last_stats = SchedulerStats()

    # ---- what LLMEngine, LLM and the core process read -------------------------------

    @property
    def num_replicas(self) -> int:
        return len(self.replicas)

    @property
    def schedulers(self) -> list[Scheduler]:
        return [c.scheduler for c in self.replicas]

    @property
    def model(self) -> Any:
        return self.replicas[0].model

    @property
    def spec(self) -> Any:
        return self.replicas[0].spec

    @property
    def dtype(self) -> Any:
        return self.replicas[0].dtype

    @property
    def max_model_len(self) -> int:
        return self.replicas[0].max_model_len

    @property
    def limits(self) -> RequestLimits:
        return self.replicas[0].limits

    @property
    def runner(self) -> Any:
        """Replica 0's runner (every replica has the same shapes, blocks and buckets)."""
        return self.replicas[0].runner

    @property
    def startup_seconds(self) -> float:
        return sum(c.startup_seconds for c in self.replicas)

    @property
    def warmup_seconds(self) -> float:
        return sum(c.warmup_seconds for c in self.replicas)

    @property
    def peak_kv_cache_usage(self) -> float:
        return max(c.peak_kv_cache_usage for c in self.replicas)

    @property
    def num_steps(self) -> int:
        """Steps of all replicas together (each replica's step counts once)."""
        return sum(c.num_steps for c in self.replicas)

    @property
    def num_compiles_after_warmup(self) -> int:
        return sum(c.num_compiles_after_warmup for c in self.replicas)

    # ---- requests ----------------------------------------------------------------------

    def add_request(
        self, request: EngineCoreRequest, *, urgent: bool = False, replica: int | None = None
    ) -> None:
        """Routes and queues a request; `replica` pins it (health probes check each one)."""
        check_new_request_id(request.request_id, self._owner)
        state = self.replicas[0].to_request(request, is_probe=urgent)  # replicas are alike
        if replica is None:
            replica = pick_replica([replica_load(s, state) for s in self.schedulers])
        self.replicas[replica].admit(state, urgent=urgent)
        self._owner[request.request_id] = replica
        self.requests_per_replica[replica] += 1

    def _by_replica(self, request_ids: Iterable[str]) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        for rid in request_ids:
            i = self._owner.pop(rid, None)
            if i is not None:
                groups.setdefault(i, []).append(rid)
        return groups

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        for i, ids in self._by_replica(request_ids).items():
            self.replicas[i].abort_requests(ids)

    def finish_requests(self, request_ids: Iterable[str], stop_reason: str) -> None:
        for i, ids in self._by_replica(request_ids).items():
            self.replicas[i].finish_requests(ids, stop_reason)

    def add_lora(self, lora_request: LoRARequest) -> None:
        """On every replica (each has its own slots); the first one checks the adapter."""
        for core in self.replicas:
            core.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> None:
        for core in self.replicas:
            core.remove_lora(lora_int_id)

    def list_loras(self) -> list[LoRARequest]:
        return self.replicas[0].list_loras()

    def has_unfinished_requests(self) -> bool:
        return any(c.has_unfinished_requests() for c in self.replicas)

    def step(self) -> EngineCoreOutputs:
        """One step of every replica that has work; their outputs, merged."""
        outputs = []
        collected = False  # some replica's step came back (async: none does on its first)
        for core in self.replicas:
            if core.has_unfinished_requests():
                out = core.step()
                outputs.extend(out.outputs)
                collected |= out.scheduler_stats is not None
        for o in outputs:
            if o.finished:
                self._owner.pop(o.request_id, None)
        if not collected:
            return EngineCoreOutputs(outputs=outputs)
        # Fresh from every replica (an idle one's blocks change too, when aborts free them).
        self.last_stats = self.make_stats()
        return EngineCoreOutputs(outputs=outputs, scheduler_stats=self.last_stats)

    def make_stats(self) -> SchedulerStats:
        stats = merge_stats([c.make_stats() for c in self.replicas])
        stats.requests_per_replica = list(self.requests_per_replica)
        return stats

    def close(self) -> None:
        for c in self.replicas:
            c.close()


def make_engine_core(
    args: EngineArgs,
    *,
    show_progress: bool = True,
    devices: Sequence[jax.Device] | None = None,
    num_reserved_seqs: int = 0,
) -> EngineCoreInterface:
    """One EngineCore, or a DPEngineCore of data_parallel_size replicas."""
    cls = EngineCore if args.data_parallel_size == 1 else DPEngineCore
    return cls(
        args, show_progress=show_progress, devices=devices, num_reserved_seqs=num_reserved_seqs
    )
