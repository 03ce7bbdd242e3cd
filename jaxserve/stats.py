"""What the offline engine did: cumulative counters and per-run snapshots, for notebooks.

`LLM.stats` is the cumulative view (a plain dict, JSON-ready for benchmarks). A `RunStats` is
the difference of two counter snapshots plus the KV block usage of every step in between, so a
notebook can print a run's hit rate or plot its KV usage without scraping logs. Plain Python:
no jax here.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from jaxserve.core.outputs import SchedulerStats

# A run keeps the KV usage of at most this many steps (the most recent ones): a long-lived
# recorder must not grow without bound.
KV_HISTORY_MAX_STEPS = 65536


@dataclass(frozen=True)
class Counters:
    """Cumulative counters of one engine at one moment; subtract two to get a run's share."""

    # user requests added (n completions of one prompt count once)
    num_requests: int = 0
    # prompt tokens of those requests (counted once per request, cached or not)
    prompt_tokens: int = 0
    # tokens generated, over all completions (including ones later cut by a stop string)
    generation_tokens: int = 0
    # engine steps and the seconds spent in them (schedule + execute + update)
    num_steps: int = 0
    step_seconds: float = 0.0
    # prefix-cache lookups and hits, in prompt tokens
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # requests preempted (blocks freed, recomputed later)
    num_preemptions: int = 0
    # XLA compiles after warmup (must stay 0: a nonzero value means a missing bucket)
    num_compiles_after_warmup: int = 0

    @classmethod
    def from_engine(
        cls, stats: SchedulerStats, num_requests: int, prompt_tokens: int, generation_tokens: int
    ) -> Counters:
        """The engine core's counters (stats from EngineCore.make_stats) plus the API's."""
        return cls(
            num_requests=num_requests,
            prompt_tokens=prompt_tokens,
            generation_tokens=generation_tokens,
            num_steps=stats.num_steps,
            step_seconds=stats.step_seconds_total,
            prefix_cache_queries=stats.prefix_cache_queries,
            prefix_cache_hits=stats.prefix_cache_hits,
            num_preemptions=stats.num_preemptions,
            num_compiles_after_warmup=stats.num_compiles_after_warmup,
        )

    def __sub__(self, other: Counters) -> Counters:
        return Counters(
            **{
                f.name: getattr(self, f.name) - getattr(other, f.name)
                for f in dataclasses.fields(Counters)
            }
        )

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Fraction of looked-up prompt tokens served from the cache (0.0 when none looked up)."""
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )


@dataclass(frozen=True)
class RunStats(Counters):
    """What one run (a generate() call, or the body of `with llm.measure()`) did: the counters'
    growth over the run, its wall time, and the KV usage after each of its steps."""

    # wall-clock seconds from the run's start to its end
    seconds: float = 0.0
    # usable KV blocks of the engine (the null block excluded)
    num_kv_blocks: int = 0
    # KV blocks held by requests after each step of the run (last KV_HISTORY_MAX_STEPS steps)
    kv_blocks_used: tuple[int, ...] = ()

    @property
    def kv_usage(self) -> list[float]:
        """kv_blocks_used as fractions of the usable blocks (what a plot wants)."""
        return [b / self.num_kv_blocks for b in self.kv_blocks_used] if self.num_kv_blocks else []

    @property
    def peak_kv_blocks(self) -> int:
        return max(self.kv_blocks_used, default=0)

    @property
    def output_tokens_per_s(self) -> float:
        return self.generation_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Every number as a flat, JSON-ready dict (the per-step history included)."""
        return {
            **dataclasses.asdict(self),
            "kv_blocks_used": list(self.kv_blocks_used),
            "prefix_cache_hit_rate": self.prefix_cache_hit_rate,
            "output_tokens_per_s": self.output_tokens_per_s,
            "peak_kv_blocks": self.peak_kv_blocks,
        }

    def __repr__(self) -> str:
        return (
            f"RunStats({self.num_requests} requests, {self.prompt_tokens} prompt + "
            f"{self.generation_tokens} generated tokens in {self.seconds:.2f} s "
            f"({self.output_tokens_per_s:.1f} tok/s), {self.num_steps} steps, "
            f"prefix cache hits {self.prefix_cache_hits}/{self.prefix_cache_queries} tokens "
            f"({self.prefix_cache_hit_rate:.0%}), {self.num_preemptions} preemptions, "
            f"{self.num_compiles_after_warmup} compiles after warmup, "
            f"peak KV {self.peak_kv_blocks}/{self.num_kv_blocks} blocks)"
        )


class RunRecorder:
    """Collects one run: a counter snapshot at start, one KV sample per step, one at finish."""

    def __init__(self, start: Counters, num_kv_blocks: int) -> None:
        self._start = start
        self._num_kv_blocks = num_kv_blocks
        self._t0 = time.perf_counter()
        self._kv: deque[int] = deque(maxlen=KV_HISTORY_MAX_STEPS)
        # set by finish()
        self.result: RunStats | None = None

    def on_step(self, num_used_blocks: int) -> None:
        self._kv.append(num_used_blocks)

    def finish(self, end: Counters) -> RunStats:
        grown = end - self._start
        self.result = RunStats(
            **{f.name: getattr(grown, f.name) for f in dataclasses.fields(Counters)},
            seconds=time.perf_counter() - self._t0,
            num_kv_blocks=self._num_kv_blocks,
            kv_blocks_used=tuple(self._kv),
        )
        return self.result


def engine_stats(core: Any, counters: Counters) -> dict[str, Any]:
    """LLM.stats: cumulative counters and the KV cache now (JSON-ready)."""
    now = core.make_stats()
    return {
        "num_requests": counters.num_requests,
        "prompt_tokens": counters.prompt_tokens,
        "generation_tokens": counters.generation_tokens,
        "num_steps": counters.num_steps,
        "step_seconds": counters.step_seconds,
        "num_compiles_after_warmup": counters.num_compiles_after_warmup,
        "prefix_cache_queries": counters.prefix_cache_queries,
        "prefix_cache_hits": counters.prefix_cache_hits,
        "prefix_cache_hit_rate": counters.prefix_cache_hit_rate,
        "num_preemptions": counters.num_preemptions,
        "num_running_reqs": now.num_running_reqs,
        "num_waiting_reqs": now.num_waiting_reqs,
        "kv_cache_usage": now.kv_cache_usage,
        "peak_kv_cache_usage": core.peak_kv_cache_usage,
        "num_used_blocks": now.num_used_blocks,
        "num_blocks": core.runner.num_blocks,
    }
