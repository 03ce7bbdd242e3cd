"""Data-parallel routing: bursts spread, prefix hits attract, a much fuller replica loses."""

import pytest

from jaxserve.core.router import ReplicaLoad, pick_replica, replica_load
from tests.core.test_scheduler import BLOCK_SIZE, make_request, make_scheduler, sample_all


def route(schedulers, request):
    i = pick_replica([replica_load(s, request) for s in schedulers])
    schedulers[i].add_request(request)
    return i


def test_a_burst_alternates_between_empty_replicas():
    schedulers = [make_scheduler(), make_scheduler()]
    # Distinct 8-token prompts (2 blocks each), added before any step: the waiting demand of
    # the first request is what sends the second one elsewhere.
    picks = [route(schedulers, make_request(f"r{i}", range(10 * i, 10 * i + 8))) for i in range(8)]
    assert picks == [0, 1, 0, 1, 0, 1, 0, 1]


def test_a_cached_prefix_attracts_its_request():
    schedulers = [make_scheduler(), make_scheduler()]
    prefix = list(range(100, 116))  # 4 full blocks
    assert route(schedulers, make_request("a", prefix + [1, 2])) == 0
    out = schedulers[0].schedule()
    schedulers[0].update_from_output(out, sample_all(out))  # prefix blocks now cached on 0
    # Replica 0 holds more blocks now, but the 4 cached blocks outweigh that.
    load0 = replica_load(schedulers[0], make_request("probe", prefix + [3, 4]))
    assert load0.prefix_hit_blocks == 4
    assert route(schedulers, make_request("b", prefix + [3, 4])) == 0
    # A prompt without that prefix goes to the emptier replica.
    assert route(schedulers, make_request("c", list(range(200, 218)))) == 1


def test_a_much_fuller_replica_loses_despite_a_prefix_hit():
    loads = [
        ReplicaLoad(
            free_blocks=50, waiting_blocks=8, num_requests=9, prefix_hit_blocks=6, total_blocks=64
        ),
        ReplicaLoad(
            free_blocks=60, waiting_blocks=0, num_requests=1, prefix_hit_blocks=0, total_blocks=64
        ),
    ]
    # headroom 42 vs 60: 18 blocks apart, more than 64 / 8 = 8, so the hit does not count
    assert pick_replica(loads) == 1
    loads[0] = ReplicaLoad(
        free_blocks=54, waiting_blocks=0, num_requests=9, prefix_hit_blocks=6, total_blocks=64
    )
    assert pick_replica(loads) == 0  # 6 apart: balanced enough, the prefix decides


def test_ties_go_to_fewer_requests_then_lower_index():
    same = dict(free_blocks=10, waiting_blocks=0, prefix_hit_blocks=0)
    assert (
        pick_replica([ReplicaLoad(num_requests=3, **same), ReplicaLoad(num_requests=2, **same)])
        == 1
    )
    assert (
        pick_replica([ReplicaLoad(num_requests=2, **same), ReplicaLoad(num_requests=2, **same)])
        == 0
    )
    with pytest.raises(ValueError, match="at least one replica"):
        pick_replica([])


def test_routing_takes_no_block():
    s = make_scheduler()
    free = s.kv_cache_manager.num_free_blocks
    replica_load(s, make_request("x", range(40)))
    assert s.kv_cache_manager.num_free_blocks == free
    assert BLOCK_SIZE == 4
