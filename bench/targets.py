"""The speed issue's targets (issue 14, "Targets"), checked against one throughput record.

Each target is a ratio or count measured in the same run, so the machine's noise cancels.
A target whose rows were skipped (or that another bench or the tests measure) shows "-".
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

# (name, how to read its value from the record, comparison, threshold, format of the value)
Target = tuple[str, Callable[[dict[str, Any]], float | None], str, float, str]


def _get(record: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def _host_us(record: dict[str, Any]) -> float | None:
    """The host cost with async scheduling on where the engine has it (the default it aims
    for), else off."""
    for mode in ("async_on", "async_off"):
        value = _get(record, "HOST", mode, "host_us_per_request_step")
        if value is not None:
            return value
    return None


def _compiles(record: dict[str, Any]) -> float | None:
    """Compiles after warmup summed over every engine run of the record that reports them."""
    counts = [
        v["stats"]["num_compiles_after_warmup"]
        for v in record.values()
        if isinstance(v, dict) and "num_compiles_after_warmup" in v.get("stats", {})
    ]
    return float(sum(counts)) if counts else None


def _c_cost(record: dict[str, Any]) -> float | None:
    cost = _get(record, "C", "cost")
    return None if cost is None else cost * 100


def _kv_use(record: dict[str, Any]) -> float | None:
    use = _get(record, "KV", "stats", "peak_kv_cache_usage")
    return None if use is None else use * 100


TARGETS: list[Target] = [
    ("workload A (f32) / its CEIL", lambda r: r.get("A_over_CEIL"), ">=", 0.8, "{:.2f}x"),
    (
        "decode attention / KV-bytes roofline",
        lambda r: _get(r, "BREAKDOWN", "f32", "attention_over_roofline"),
        "<=",
        2.0,
        "{:.1f}x",
    ),
    (
        "1024-token prefill / no-attention prefill",
        lambda r: _get(r, "PREFILL", "ratio"),
        ">=",
        0.7,
        "{:.2f}x",
    ),
    ("workload A bf16 / A f32", lambda r: r.get("A16_over_A"), ">=", 1.5, "{:.2f}x"),
    ("host us per request per step (256 reqs)", _host_us, "<=", 10.0, "{:.1f} us"),
    ("prefix caching B speedup", lambda r: r.get("B_speedup"), ">=", 3.0, "{:.1f}x"),
    ("caching cost C at 0% hits (%)", _c_cost, "<=", 2.0, "{:+.1f}%"),
    ("peak KV use under a KV-bound load (%)", _kv_use, ">=", 90.0, "{:.1f}%"),
    ("compiles after warmup (all engines)", _compiles, "<=", 0.0, "{:.0f}"),
]

# Targets this bench does not measure, and where they are measured.
ELSEWHERE = [
    ("serving ITL p99 / p50 <= 3x, HTTP tok/s kept", "bench/serve.py (prints it)"),
    ("batch-invariant greedy, every parity test", "the test suite"),
]

_OPS = {">=": operator.ge, "<=": operator.le}


def check_targets(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target with its value in `record` (None: not measured) and whether it is met."""
    out = []
    for name, read, op, threshold, fmt in TARGETS:
        value = read(record)
        out.append(
            {
                "target": f"{name} {op} {threshold:g}",
                "value": value,
                "shown": "-" if value is None else fmt.format(value),
                "met": None if value is None else bool(_OPS[op](value, threshold)),
            }
        )
    for name, where in ELSEWHERE:
        out.append({"target": name, "value": None, "shown": where, "met": None})
    return out


def print_targets(checked: list[dict[str, Any]]) -> None:
    print(f"\n{'target':<58} {'value':>28}  met")
    for t in checked:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
        print(f"{t['target']:<58} {t['shown']:>28}  {met}")
