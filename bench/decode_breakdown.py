"""Where a decode step's time goes: dense, attention and host, and attention against its
KV-bytes roofline at the read bandwidth measured in the same run.

A StepProbe wraps an engine runner's jitted step (its forward and sampler programs) for one
generate(): it notes when each forward starts and its bucket, and keeps the inputs of the
steps in the decode bucket (references only; reading device arrays there would sync the loop
it measures). After the run it replays one mid-run decode step's real inputs on the engine's
own params and cache:

  device    = the jitted step, forward then sampler, with real attention (block_until_ready;
              median and best of reps)
  dense     = the same step built with attention a no-op (weights, KV writes, sampler)
  attention = device - dense (best of reps of each)
  host      = wall time between consecutive decode calls in the engine loop (median) -
              device (median)

so host is what the loop exposes on top of the device step (with async scheduling, only the
part it does not hide). The roofline is the KV bytes the step must read per layer (sum of kv
lens x 2 x kv heads x head dim x itemsize) over the measured read bandwidth.

The gather floor is what copying those bytes costs before any math: one layer's K and V blocks
of the step's live requests gathered into fresh arrays, as a paged attention must hand XLA's
dots a buffer (XLA:CPU fuses no gather into a dot). An attention that gathers cannot beat it,
so floor / roofline bounds attention / roofline from below on this backend.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from timing import timed
from workloads import attention_disabled


def read_bandwidth(nbytes: int = 2**30, reps: int = 5) -> dict[str, Any]:
    """Bytes/s of a jitted jnp.sum over an `nbytes` f32 array, best of `reps`."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    times = timed(lambda: total(x), reps)
    x.delete()
    return {"bytes": nbytes, "seconds": times, "bytes_per_s": nbytes / min(times)}


def dot_rate(dtype: str, shape: tuple[int, int, int] = (512, 576, 1536), reps: int = 10) -> float:
    """FLOP/s of a jitted [M, K] x [K, N] jnp.dot of `dtype` operands accumulating in f32
    (preferred_element_type), best of `reps`: whether this CPU's dots gain from bf16."""
    m, k, n = shape
    a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    return 2 * m * k * n / min(timed(lambda: dot(a, b), reps))


def gather_floor(cache: Any, tables: np.ndarray, kv_lens: np.ndarray, reps: int) -> float:
    """Best seconds to gather one layer's K and V blocks holding each live row's context
    (`tables` rows, `kv_lens` > 0) into fresh arrays (the module docstring's gather floor)."""
    bs = cache.k.shape[2]
    live = [tables[r, : -(-int(n) // bs)] for r, n in enumerate(kv_lens) if n > 0]
    idx = jnp.asarray(np.concatenate(live).astype(np.int32))
    gather = jax.jit(lambda k, v, i: (k[0, i], v[0, i]))
    return min(timed(lambda: gather(cache.k, cache.v, idx), reps))


def _step_seconds(fn: Any, runner: Any, inputs: Any, sampling: Any, reps: int) -> dict[str, Any]:
    """One step (a runner StepFn) on `inputs` and `sampling` (the runner's params; its cache
    donated and taken back): seconds per call, the first (compile, warm caches) left out."""
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        runner.kv_cache, out, prompt_out, _ = fn(*runner._step_args(inputs), sampling)
        jax.block_until_ready((runner.kv_cache, out, prompt_out))
        times.append(time.perf_counter() - start)
    times = times[1:]
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": reps}


def _host_copy(x: Any) -> Any:
    """A copy of a host (numpy) array, which a persistent input buffer may overwrite later; a
    device array as it is (copying it here would sync the loop being measured)."""
    return np.array(x) if isinstance(x, np.ndarray) else x


class StepProbe:
    """Decode-step breakdown of one engine run (workloads.run_jaxserve's probe)."""

    def __init__(self, decode_reqs: int, reps: int = 10, bandwidth: float | None = None) -> None:
        # requests a decode step of this run holds (picks the decode bucket)
        self.decode_reqs = decode_reqs
        # timed calls of each replayed step
        self.reps = reps
        # read bytes/s for the roofline (None: no roofline)
        self.bandwidth = bandwidth
        # (start time, T bucket, kv_lens, cu_q_lens) of every step call of the run
        self.calls: list[tuple[float, int, Any, Any]] = []
        # call index -> (forward inputs, sampler inputs), for the calls in the decode bucket
        self.decode_inputs: dict[int, Any] = {}
        self._fn: Any = None
        self._decode_t = 0

    def attach(self, runner: Any) -> None:
        self._fn = runner._step_fn
        self._decode_t = runner.buckets.select(self.decode_reqs, 1)[0]
        runner._step_fn = dataclasses.replace(self._fn, forward=self._call, sample=self._sample)

    def _sample(self, logits: Any, sampling: Any) -> Any:
        last = len(self.calls) - 1
        if last in self.decode_inputs:
            self.decode_inputs[last] = (self.decode_inputs[last], sampling)
        return self._fn.sample(logits, sampling)

    def _call(self, params: Any, lora: Any, kv_cache: Any, last_ids: Any, inputs: Any) -> Any:
        md = inputs.attn
        self.calls.append(
            (
                time.perf_counter(),
                inputs.num_tokens,
                _host_copy(md.kv_lens),
                _host_copy(md.cu_q_lens),
            )
        )
        if inputs.num_tokens == self._decode_t:
            self.decode_inputs[len(self.calls) - 1] = inputs
        return self._fn.forward(params, lora, kv_cache, last_ids, inputs)

    def full_decode_calls(self) -> list[int]:
        """Indices of the calls that decode the run's fullest batch and nothing else (a step
        with a prefill chunk, or a thinner batch at the run's ends, is left out)."""
        live: dict[int, int] = {}
        for i, (_, t, kv_lens, cu_q_lens) in enumerate(self.calls):
            if t != self._decode_t:
                continue
            n = int((np.asarray(kv_lens) > 0).sum())
            if int(np.asarray(cu_q_lens)[-1]) == n:  # one new token per live request
                live[i] = n
        most = max(live.values(), default=0)
        return [i for i, n in live.items() if n == most]

    def wall_per_decode_step(self, full: list[int]) -> float:
        """Median seconds from the start of a full decode call to the next call's start,
        when that one is a full decode call too."""
        starts = {i: self.calls[i][0] for i in full}
        gaps = [starts[i + 1] - starts[i] for i in full if i + 1 in starts]
        if not gaps:
            raise RuntimeError(
                f"no two consecutive decode steps (T={self._decode_t}) seen: did the runner "
                "stop calling _step_fn, or is the run too short?"
            )
        return statistics.median(gaps)

    def measure(self, runner: Any) -> dict[str, Any]:
        runner._step_fn = self._fn  # the engine's own step again
        full = self.full_decode_calls()
        wall = self.wall_per_decode_step(full)
        middle = full[len(full) // 2]
        inputs, sampling = self.decode_inputs[middle]
        self.decode_inputs = {}
        kv_lens = np.asarray(self.calls[middle][2])
        live = kv_lens[kv_lens > 0]
        device = _step_seconds(self._fn, runner, inputs, sampling, self.reps)
        with attention_disabled():
            dense_fn = runner._make_step_fn(runner.attention_backend)
        dense = _step_seconds(dense_fn, runner, inputs, sampling, self.reps)
        spec = runner.spec
        # a difference of two timings: best of reps, where another process's bursts are least
        attention = device["min_s"] - dense["min_s"]
        out: dict[str, Any] = {
            "decode_bucket_T": self._decode_t,
            "full_decode_steps": len(full),
            "requests": int(live.size),
            "context_mean": float(live.mean()),
            "num_layers": spec.num_layers,
            "wall_step_s": wall,
            "device_step": device,
            "dense_step": dense,
            "attention_step_s": attention,
            "attention_per_layer_s": attention / spec.num_layers,
            "host_step_s": wall - device["median_s"],
            "host_us_per_request_step": (wall - device["median_s"]) / live.size * 1e6,
        }
        if self.bandwidth is not None:
            itemsize = runner.kv_cache.k.dtype.itemsize
            kv_bytes = int(live.sum()) * 2 * spec.num_kv_heads * spec.head_dim * itemsize
            roofline = kv_bytes / self.bandwidth
            tables = np.asarray(inputs.attn.block_tables)
            floor = gather_floor(runner.kv_cache, tables, kv_lens, self.reps)
            out.update(
                kv_bytes_per_layer=kv_bytes,
                read_bytes_per_s=self.bandwidth,
                roofline_per_layer_s=roofline,
                gather_floor_per_layer_s=floor,
                gather_floor_over_roofline=floor / roofline,
                # None when the difference drowned in noise (no ratio to report)
                attention_over_roofline=(
                    out["attention_per_layer_s"] / roofline if attention > 0 else None
                ),
            )
        return out


def breakdown_rows(label: str, b: dict[str, Any]) -> list[tuple[str, float, str]]:
    """Table rows of one breakdown (ms per decode step; tok/s column left empty)."""
    ms = 1e3
    note = (
        f"{b['requests']} reqs x ~{b['context_mean']:.0f} ctx: wall {b['wall_step_s'] * ms:.1f}"
        f" = device {b['device_step']['median_s'] * ms:.1f} (best"
        f" {b['device_step']['min_s'] * ms:.1f} = dense {b['dense_step']['min_s'] * ms:.1f}"
        " + attention"
        f" {b['attention_step_s'] * ms:.1f}) + host {b['host_step_s'] * ms:.1f} ms"
    )
    rows = [(f"BREAKDOWN {label} decode step", float("nan"), note)]
    if b.get("attention_over_roofline") is not None:
        rows.append(
            (
                f"BREAKDOWN {label} attention/roofline",
                float("nan"),
                f"{b['attention_per_layer_s'] * ms:.3f} ms/layer vs"
                f" {b['roofline_per_layer_s'] * ms:.3f} ms ({b['kv_bytes_per_layer'] / 1e6:.1f}"
                f" MB at {b['read_bytes_per_s'] / 1e9:.0f} GB/s):"
                f" {b['attention_over_roofline']:.1f}x",
            )
        )
    elif "roofline_per_layer_s" in b:
        rows.append((f"BREAKDOWN {label} attention/roofline", float("nan"), "below the noise"))
    if "gather_floor_per_layer_s" in b:
        rows.append(
            (
                f"BREAKDOWN {label} gather floor/roofline",
                float("nan"),
                f"{b['gather_floor_per_layer_s'] * ms:.3f} ms/layer to copy the step's KV:"
                f" {b['gather_floor_over_roofline']:.1f}x (attention cannot go below it)",
            )
        )
    return rows
