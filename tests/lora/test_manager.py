"""LoRAManager (host cache + device slots) and LoRAUse (the max_loras rule), host only."""

from __future__ import annotations

import pytest

from jaxserve.core.lora_use import LoRAUse
from jaxserve.lora.manager import LoRAManager
from jaxserve.lora.request import LoRARequest
from jaxserve.request import Request
from jaxserve.sampling_params import SamplingParams


def lora(i: int) -> LoRARequest:
    return LoRARequest(f"a{i}", i, f"/adapters/a{i}")


class Fakes:
    def __init__(self) -> None:
        self.reads: list[int] = []
        self.writes: list[tuple[int, object]] = []

    def read(self, r: LoRARequest) -> object:
        if r.lora_path.endswith("bad"):
            raise ValueError(f"{r.lora_path}: adapter_config.json is missing")
        self.reads.append(r.lora_int_id)
        return f"weights-{r.lora_int_id}"

    def write(self, slot: int, weights: object) -> None:
        self.writes.append((slot, weights))


def make(max_loras: int = 2, max_cpu_loras: int = 3) -> tuple[LoRAManager, Fakes]:
    f = Fakes()
    return LoRAManager(
        max_loras=max_loras, max_cpu_loras=max_cpu_loras, read=f.read, write_slot=f.write
    ), f


def test_slots_are_lru_and_never_taken_from_a_running_adapter():
    m, f = make()
    for i in (1, 2, 3):
        m.add(lora(i))
    m.prepare([1, 2], running={1, 2})
    assert m.resident == {1: 1, 2: 2}
    m.prepare([1], running={1})  # 1 is now the most recent
    m.prepare([3], running={1, 3})  # evicts 2, the least recently used idle one
    assert m.resident == {1: 1, 3: 2}
    assert m.stats.num_slot_evictions == 1
    assert f.writes[-1] == (2, "weights-3")
    with pytest.raises(RuntimeError, match="no free LoRA slot"):
        m.add(lora(4))
        m.prepare([4], running={1, 3, 4})
    assert m.slot_of(0) == 0 and m.slot_of(3) == 2


def test_host_cache_is_lru_and_keeps_pinned_and_resident_adapters():
    m, f = make(max_loras=1, max_cpu_loras=2)
    m.add(lora(1))
    m.prepare([1], running={1})
    m.add(lora(2), pinned={2})
    m.add(lora(3), pinned={2})  # over the cap: 1 is resident, 2 pinned, so nothing evictable
    assert m.cached == [1, 2, 3]
    m.add(lora(4), pinned=set())  # now the idle, non-resident ones go, oldest first
    assert m.cached == [1, 4]
    assert m.stats.num_cpu_evictions == 2
    m.add(lora(2))  # read again from disk
    assert f.reads.count(2) == 2 and m.stats.num_loads == 5


def test_bad_adapters_and_id_clashes_are_refused_and_change_nothing():
    m, f = make()
    with pytest.raises(ValueError, match="adapter_config.json"):
        m.add(LoRARequest("x", 7, "/adapters/bad"))
    m.add(lora(1))
    with pytest.raises(ValueError, match="lora_int_id 1 is already used by adapter 'a1'"):
        m.add(LoRARequest("other", 1, "/elsewhere"))
    assert m.cached == [1] and m.list_loras() == [lora(1)]


def test_remove_waits_for_the_last_request_then_frees_the_slot():
    m, f = make()
    m.add(lora(1))
    m.prepare([1], running={1})
    m.remove(1)
    with pytest.raises(ValueError, match="being unloaded"):
        m.add(lora(1))
    assert m.list_loras() == []
    assert m.collect(in_use={1}) == [] and m.resident == {1: 1}
    assert m.collect(in_use=set()) == [1]
    assert m.resident == {} and m.cached == [] and f.writes[-1] == (1, None)
    m.add(lora(1))  # it may come back, into the freed slot
    m.prepare([1], running={1})
    assert m.resident == {1: 1}
    with pytest.raises(ValueError, match="not loaded"):
        m.remove(9)


def _request(rid: str, lid: int) -> Request:
    return Request(
        rid,
        [1, 2],
        SamplingParams(max_tokens=4),
        None,
        sampling_seed=0,
        lora_request=lora(lid) if lid else None,
        max_tokens=4,
    )


def test_lora_use_counts_unfinished_requests_and_caps_running_adapters():
    use = LoRAUse(max_loras=2)
    reqs = [_request("a", 1), _request("b", 1), _request("c", 2), _request("d", 0)]
    for r in reqs:
        use.add(r)
    assert use.refs == {1: 2, 2: 1}
    running = use.running_ids(reqs[:3])
    assert running == {1, 2}
    assert use.fits(_request("e", 1), running) and use.fits(_request("f", 0), running)
    assert not use.fits(_request("g", 3), running)
    assert use.fits(_request("g", 3), {1})
    use.remove(reqs[0])
    use.remove(reqs[1])
    assert use.refs == {2: 1}
    assert LoRAUse(None).fits(_request("h", 5), {1, 2, 3})


def test_scheduler_skips_a_request_over_max_loras_and_runs_those_behind_it():
    from jaxserve.config import CacheConfig, SchedulerConfig
    from jaxserve.core.scheduler import Scheduler

    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=32),
        CacheConfig(block_size=4),
        num_blocks=64,
        max_loras=2,
    )
    for rid, lid in (("a", 1), ("b", 2), ("c", 3), ("d", 0), ("e", 1)):
        sched.add_request(_request(rid, lid))
    out = sched.schedule()
    assert [sr.request.request_id for sr in out.scheduled] == ["a", "b", "d", "e"]
    assert [r.request_id for r in sched.waiting] == ["c"]  # kept its place, waits for a slot
    sched.abort_requests(["a", "e"])  # adapter 1 has no running request left
    out = sched.schedule()
    assert "c" in [sr.request.request_id for sr in out.scheduled]
    assert sched.lora_use.refs == {2: 1, 3: 1}
