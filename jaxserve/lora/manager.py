"""LoRAManager: the engine core's adapters: read on the host, placed in device slots.

Two caches, both least-recently-used:
- host: up to max_cpu_loras adapters read from disk (LoRAWeights). An adapter any unfinished
  request uses is pinned there (it was read when that request was admitted, so a step never
  reads a file, and a file deleted after admission cannot fail a running request). Past the
  cap with everything pinned, the cache grows rather than refuse a request.
- device: max_loras slots. Before each step, `prepare` gives every adapter of the step a slot,
  evicting the least recently used slot that no running request holds (the scheduler keeps
  running adapters <= max_loras, so one always exists).

Removal (`remove`) stops new requests at once and frees the adapter once its last request has
finished (`collect`). Nothing here imports jax: slot writes go through `write_slot`.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from jaxserve.lora.request import LoRARequest

logger = logging.getLogger(__name__)


@dataclass
class LoRAStats:
    """Counters for /metrics, cumulative since start."""

    # adapters read from disk (an adapter read again after eviction counts again)
    num_loads: int = 0
    # adapters dropped from host memory to make room
    num_cpu_evictions: int = 0
    # adapters taken out of a device slot to make room for another
    num_slot_evictions: int = 0
    # lora_name -> requests admitted on it
    requests: Counter[str] = field(default_factory=Counter)
    # lora_name -> tokens generated on it
    generated_tokens: Counter[str] = field(default_factory=Counter)


class LoRAManager:
    def __init__(
        self,
        *,
        max_loras: int,
        max_cpu_loras: int,
        read: Callable[[LoRARequest], object],
        write_slot: Callable[[int, object], None],
    ) -> None:
        """read: LoRARequest -> LoRAWeights (raises ValueError naming what is wrong);
        write_slot(slot, weights): puts an adapter in device slot 1..max_loras."""
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self._read = read
        self._write_slot = write_slot
        # lora_int_id -> (request, weights), least recently used first
        self._host: OrderedDict[int, tuple[LoRARequest, object]] = OrderedDict()
        # lora_int_id -> device slot, least recently used first
        self._slots: OrderedDict[int, int] = OrderedDict()
        self._free_slots = list(range(max_loras, 0, -1))  # pop() hands out 1 first
        # ids being removed: refused to new requests, freed when unused
        self._removing: set[int] = set()
        self.stats = LoRAStats()

    # ---- adapters in and out --------------------------------------------------------------

    def add(self, lora: LoRARequest, pinned: Collection[int] = ()) -> None:
        """Reads the adapter into host memory unless it is there (ValueError if it is bad, or
        its id is taken by another adapter, or it is being removed)."""
        if lora.lora_int_id in self._removing:
            raise ValueError(
                f"lora_request: adapter {lora.lora_name!r} (id {lora.lora_int_id}) is being "
                "unloaded"
            )
        known = self._host.get(lora.lora_int_id)
        if known is not None:
            if known[0] != lora:
                raise ValueError(
                    f"lora_request: lora_int_id {lora.lora_int_id} is already used by adapter "
                    f"{known[0].lora_name!r} at {known[0].lora_path!r}"
                )
            self._host.move_to_end(lora.lora_int_id)
            return
        weights = self._read(lora)
        self.stats.num_loads += 1
        self._host[lora.lora_int_id] = (lora, weights)
        self._evict_host({*pinned, lora.lora_int_id})

    def _evict_host(self, pinned: Collection[int]) -> None:
        for lid in list(self._host):
            if len(self._host) <= self.max_cpu_loras:
                return
            if lid in pinned or lid in self._slots:
                continue
            del self._host[lid]
            self.stats.num_cpu_evictions += 1

    def remove(self, lora_int_id: int) -> None:
        """New requests on it are refused from now; `collect` frees it once unused."""
        if lora_int_id not in self._host and lora_int_id not in self._slots:
            raise ValueError(f"lora_int_id {lora_int_id} is not loaded")
        self._removing.add(lora_int_id)

    def collect(self, in_use: Collection[int]) -> list[int]:
        """Frees the removed adapters no unfinished request uses; returns their ids."""
        done = [lid for lid in self._removing if lid not in in_use]
        for lid in done:
            self._removing.discard(lid)
            self._host.pop(lid, None)
            slot = self._slots.pop(lid, None)
            if slot is not None:
                self._write_slot(slot, None)  # stale weights must not linger in a slot
                self._free_slots.append(slot)
        return done

    def list_loras(self) -> list[LoRARequest]:
        """The adapters in host memory (not being removed), least recently used first."""
        return [r for lid, (r, _) in self._host.items() if lid not in self._removing]

    # ---- device slots ---------------------------------------------------------------------

    def prepare(self, lora_ids: Iterable[int], running: Collection[int]) -> None:
        """Gives every adapter of a step a device slot (writing the ones not resident yet).

        running: the adapters of all running requests; their slots are never taken.
        """
        for lid in lora_ids:
            if lid in self._slots:
                self._slots.move_to_end(lid)
                continue
            if self._free_slots:
                slot = self._free_slots.pop()
            else:
                victim = next((v for v in self._slots if v not in running), None)
                if victim is None:
                    raise RuntimeError(
                        f"no free LoRA slot: {len(running)} running adapters for "
                        f"{self.max_loras} slots (the scheduler should have kept them apart)"
                    )
                slot = self._slots.pop(victim)
                self.stats.num_slot_evictions += 1
            _, weights = self._host[lid]  # pinned since its request's admission
            self._write_slot(slot, weights)
            self._slots[lid] = slot

    def slot_of(self, lora_int_id: int) -> int:
        """The device slot of a prepared adapter; 0 (no adapter) for id 0."""
        return 0 if lora_int_id == 0 else self._slots[lora_int_id]

    @property
    def resident(self) -> dict[int, int]:
        """lora_int_id -> device slot, for tests and stats."""
        return dict(self._slots)

    @property
    def cached(self) -> list[int]:
        """Ids in host memory, least recently used first."""
        return list(self._host)
