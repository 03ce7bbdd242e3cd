"""Data-parallel routing: which engine replica a new request goes to (host-side, no jax).

Each replica is a whole engine (scheduler + KV cache) on its own slice of the devices. The
rule, in order:
1. Balance: a replica's headroom is its free KV blocks minus what its waiting requests will
   need. Only replicas within `BALANCE_SLACK` of the best headroom are candidates, so no
   replica is loaded much beyond the others.
2. Prefix affinity: among the candidates, the one already holding the most leading blocks of
   the prompt in its prefix cache wins (same system prompt or conversation -> same replica:
   those blocks and their prefill are saved).
3. Then the most headroom, then fewer requests, then the lower index.
Counting the waiting requests' demand is what spreads a burst: requests added in the same
instant see each other's demand before any step has run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jaxserve.core.scheduler import Scheduler
from jaxserve.request import Request


@dataclass(frozen=True)
class ReplicaLoad:
    # blocks free now (freed blocks still holding cached prefixes count as free)
    free_blocks: int
    # blocks the replica's waiting requests still need for their prompts
    waiting_blocks: int
    # running + waiting requests
    num_requests: int
    # leading blocks of the new request's prompt already in this replica's prefix cache
    prefix_hit_blocks: int
    # usable blocks of the replica (all but the null block)
    total_blocks: int = 0

    @property
    def headroom(self) -> int:
        return self.free_blocks - self.waiting_blocks


# Replicas whose headroom is within this fraction of a replica's blocks of the best one are
# "balanced enough" for prefix affinity to decide (1/8: a cached prefix may pull a request
# onto a replica at most 12.5% of the cache fuller than the emptiest one).
BALANCE_SLACK = 0.125


def replica_load(scheduler: Scheduler, request: Request) -> ReplicaLoad:
    """The load of one replica as seen by `request` (reads only; takes no block)."""
    kv = scheduler.kv_cache_manager
    bs = kv.block_size
    waiting = sum(-(-(r.num_tokens - r.num_computed_tokens) // bs) for r in scheduler.waiting)
    hit_blocks, _ = kv.get_computed_blocks(request)
    return ReplicaLoad(
        free_blocks=kv.num_free_blocks,
        waiting_blocks=waiting,
        num_requests=len(scheduler.running) + len(scheduler.waiting),
        prefix_hit_blocks=len(hit_blocks),
        total_blocks=kv.num_usable_blocks,
    )


def pick_replica(loads: Sequence[ReplicaLoad]) -> int:
    """Index of the replica to route to (see the module docstring for the rule)."""
    if not loads:
        raise ValueError("pick_replica needs at least one replica")
    best = max(load.headroom for load in loads)
    candidates = [
        i
        for i, load in enumerate(loads)
        if load.headroom >= best - int(BALANCE_SLACK * load.total_blocks)
    ]
    return max(
        candidates,
        key=lambda i: (loads[i].prefix_hit_blocks, loads[i].headroom, -loads[i].num_requests, -i),
    )
