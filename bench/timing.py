"""How the benches time a jitted call: one untimed call first (compile, warm caches), then
`reps` timed ones, each blocked on until its outputs are ready."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax


def timed(call: Callable[[], Any], reps: int) -> list[float]:
    """Wall seconds of each of `reps` calls of `call`, after one untimed call."""
    jax.block_until_ready(call())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return times
