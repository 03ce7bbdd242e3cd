"""JAX's persistent compilation cache, on by default: a restart reuses compiled step programs."""

from __future__ import annotations

import os

import jax

from jaxserve.paths import cache_root

_enabled = False


def enable_persistent_compilation_cache() -> str | None:
    """Points JAX at <cache root>/xla (once per process); JAXSERVE_XLA_CACHE=0 turns it off."""
    global _enabled
    if os.environ.get("JAXSERVE_XLA_CACHE", "1") == "0":
        return None
    path = str(cache_root() / "xla")
    if not _enabled:
        jax.config.update("jax_compilation_cache_dir", path)
        # Cache every program, even fast compiles: the step buckets are many small compiles.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        _enabled = True
    return path
