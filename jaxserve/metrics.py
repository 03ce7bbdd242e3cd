"""Prometheus metrics of the API server, in a private registry (one per app, so tests and
several apps in one process never collide).

Engine-side numbers (queue sizes, KV usage, prefix-cache and preemption counts) are read from
`EngineClient.stats` at scrape time by a custom collector; latencies are measured here, in
the API process, where the client sees them.

Step time is exported as two counters (steps, seconds in steps): rate(seconds) / rate(steps)
is the mean step time over any window, which a gauge of the last step could not give.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jaxserve.core.outputs import SchedulerStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# latency buckets (seconds): ms-scale decode steps up to minute-long CPU requests
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.2, 0.4, 0.8, 1.6, 5.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class _EngineStatsCollector(Collector):
    """Exports the latest SchedulerStats on each scrape (the core keeps the cumulative
    counts, so they are exposed as counters without double counting)."""

    def __init__(self, model_name: str, get_stats: Callable[[], SchedulerStats | None]) -> None:
        self._model_name = model_name
        self._get_stats = get_stats

    def collect(self) -> Iterator[Metric]:
        stats = self._get_stats() or SchedulerStats()
        labels = [self._model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(labels, value)
            return c

        yield gauge(
            "jaxserve_num_requests_running",
            "Requests in the running batch.",
            stats.num_running_reqs,
        )
        yield gauge(
            "jaxserve_num_requests_waiting",
            "Requests in the waiting queue.",
            stats.num_waiting_reqs,
        )
        yield gauge(
            "jaxserve_kv_cache_usage_perc",
            "Fraction of KV cache blocks held by requests (1 = full).",
            stats.kv_cache_usage,
        )
        yield gauge(
            "jaxserve_kv_cache_used_blocks",
            "KV cache blocks held by requests (0 when idle: anything else is a leak).",
            stats.num_used_blocks,
        )
        yield counter(
            "jaxserve_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            stats.prefix_cache_queries,
        )
        yield counter(
            "jaxserve_prefix_cache_hits",
            "Prompt tokens served from the prefix cache.",
            stats.prefix_cache_hits,
        )
        yield counter(
            "jaxserve_num_preemptions",
            "Requests preempted (KV blocks freed, recomputed later).",
            stats.num_preemptions,
        )
        yield counter("jaxserve_engine_steps", "Engine core steps.", stats.num_steps)
        yield counter(
            "jaxserve_engine_step_seconds",
            "Seconds spent in engine steps (schedule + execute + update).",
            stats.step_seconds_total,
        )
        yield gauge(
            "jaxserve_num_compiles_after_warmup",
            "XLA compilations after warmup (should stay 0: every shape is precompiled).",
            stats.num_compiles_after_warmup,
        )
        yield counter(
            "jaxserve_engine_core_restarts",
            "Engine-core processes started after one died (see --max-core-restarts).",
            stats.num_core_restarts,
        )
        yield from self._lora(stats, counter)
        if stats.requests_per_replica:
            routed = CounterMetricFamily(
                "jaxserve_dp_requests_routed",
                "Requests routed to each data-parallel replica.",
                labels=["model_name", "replica"],
            )
            for i, n in enumerate(stats.requests_per_replica):
                routed.add_metric([self._model_name, str(i)], n)
            yield routed

    def _lora(
        self, stats: SchedulerStats, counter: Callable[[str, str, float], CounterMetricFamily]
    ) -> Iterator[Metric]:
        """LoRA counters, once an adapter has been read (absent on engines without LoRA)."""
        if not stats.lora_loads:
            return
        yield counter("jaxserve_lora_loads", "LoRA adapters read from disk.", stats.lora_loads)
        yield counter(
            "jaxserve_lora_cpu_evictions",
            "LoRA adapters dropped from host memory (--max-cpu-loras).",
            stats.lora_cpu_evictions,
        )
        yield counter(
            "jaxserve_lora_slot_evictions",
            "LoRA adapters evicted from a device slot for another (--max-loras).",
            stats.lora_slot_evictions,
        )
        for name, doc, values in (
            ("jaxserve_lora_requests", "Requests admitted per LoRA adapter.", stats.lora_requests),
            (
                "jaxserve_lora_generation_tokens",
                "Tokens generated per LoRA adapter.",
                stats.lora_generated_tokens,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=["model_name", "lora_name"])
            for lora_name, n in sorted(values.items()):
                family.add_metric([self._model_name, lora_name], n)
            yield family


class ServerMetrics:
    def __init__(
        self, model_name: str, get_stats: Callable[[], SchedulerStats | None] = lambda: None
    ) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(model_name, get_stats))
        kw = {"labelnames": ["model_name"], "registry": self.registry}
        self.prompt_tokens = Counter(
            "jaxserve_prompt_tokens", "Prompt tokens of admitted requests.", **kw
        ).labels(model_name)
        self.generation_tokens = Counter(
            "jaxserve_generation_tokens", "Generated tokens.", **kw
        ).labels(model_name)
        self._finished = Counter(
            "jaxserve_request_success",
            "Finished completions by finish reason (stop, length, abort).",
            labelnames=["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "jaxserve_time_to_first_token_seconds",
            "Arrival at the API server to the first generated token.",
            buckets=_TTFT_BUCKETS,
            **kw,
        ).labels(model_name)
        self.itl = Histogram(
            "jaxserve_inter_token_latency_seconds",
            "Time between successive tokens of one completion.",
            buckets=_ITL_BUCKETS,
            **kw,
        ).labels(model_name)
        self.e2e = Histogram(
            "jaxserve_e2e_request_latency_seconds",
            "Arrival at the API server to the last token.",
            buckets=_E2E_BUCKETS,
            **kw,
        ).labels(model_name)

    def request(self) -> RequestMetrics:
        """Starts timing one engine request (call at its arrival)."""
        return RequestMetrics(self)

    def finished(self, reason: str) -> None:
        self._finished.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """Timings of one engine request (all its n completions), measured on arrival of deltas."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._m = metrics
        self._arrival = time.monotonic()
        self._first: float | None = None
        # completion index -> when its last token arrived
        self._last: dict[int, float] = {}

    def on_admitted(self, num_prompt_tokens: int) -> None:
        """The engine answered (counted here so rejected requests add no prompt tokens)."""
        self._m.prompt_tokens.inc(num_prompt_tokens)

    def on_tokens(self, index: int, num_new: int) -> None:
        if num_new <= 0:
            return
        t = time.monotonic()
        self._m.generation_tokens.inc(num_new)
        if self._first is None:
            self._first = t
            self._m.ttft.observe(t - self._arrival)
        prev = self._last.get(index)
        if prev is not None:
            # a delta with k tokens came in one step: k gaps of (elapsed / k)
            for _ in range(num_new):
                self._m.itl.observe((t - prev) / num_new)
        self._last[index] = t

    def on_finished(self, reason: str) -> None:
        self._m.finished(reason)

    def on_done(self) -> None:
        """Every completion finished (not called for aborted or failed requests)."""
        self._m.e2e.observe(time.monotonic() - self._arrival)
