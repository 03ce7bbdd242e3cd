"""The scheduler's reserved seat: health probes jump the queue and never wait for a seat."""

from __future__ import annotations

from jaxserve.config import CacheConfig, SchedulerConfig
from jaxserve.core.scheduler import Scheduler
from jaxserve.request import Request
from jaxserve.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def make_request(request_id: str) -> Request:
    return Request(request_id, [1, 2, 3], GREEDY, None, sampling_seed=0, max_tokens=4)


def test_reserved_seat_admits_only_urgent_requests():
    config = SchedulerConfig(max_num_seqs=2, max_model_len=64, num_reserved_seqs=1)
    sched = Scheduler(config, CacheConfig(), 20)
    sched.add_request(make_request("a"))
    sched.add_request(make_request("b"))
    sched.schedule()
    assert [r.request_id for r in sched.running] == ["a"]  # "b" may not take the last seat
    sched.add_request(make_request("probe"), urgent=True)
    assert [r.request_id for r in sched.waiting] == ["probe", "b"]
    sched.schedule()
    assert [r.request_id for r in sched.running] == ["a", "probe"]
    sched.abort_requests(["probe"])
    assert not sched._urgent_req_ids
    sched.schedule()
    assert [r.request_id for r in sched.running] == ["a"]  # the seat is reserved again


def test_no_reservation_by_default():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_model_len=64), CacheConfig(), 20)
    for rid in "abc":
        sched.add_request(make_request(rid))
    sched.schedule()
    assert [r.request_id for r in sched.running] == ["a", "b"]
