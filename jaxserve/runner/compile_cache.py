"""JAX's persistent compilation cache, on by default: a restart reuses compiled step programs.

`PersistentCompileCache` owns the jax.config settings that turn it on: an engine opens one when
it starts and closes it when it closes, and the settings go back to what they were once the
last open one in the process closes (jax.config is process-wide, so the owners are counted).
Nothing is changed at import time. JAXSERVE_XLA_CACHE=0 turns the cache off.
"""

from __future__ import annotations

import os
import threading
from typing import Any, ClassVar

import jax

from jaxserve.paths import cache_root

# Cache every program, even fast compiles: the step buckets are many small compiles.
_SETTINGS = {
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}


class PersistentCompileCache:
    # how many are open in this process, and the settings from before the first
    _num_open: ClassVar[int] = 0
    _saved: ClassVar[dict[str, Any]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        # <cache root>/xla, or None when JAXSERVE_XLA_CACHE=0
        self.path: str | None = None
        if os.environ.get("JAXSERVE_XLA_CACHE", "1") == "0":
            return
        self.path = str(cache_root() / "xla")
        settings = {"jax_compilation_cache_dir": self.path, **_SETTINGS}
        cls = PersistentCompileCache
        with cls._lock:
            if cls._num_open == 0:
                cls._saved = {name: getattr(jax.config, name) for name in settings}
                for name, value in settings.items():
                    jax.config.update(name, value)
            cls._num_open += 1
        self._is_open = True

    def close(self) -> None:
        """Idempotent; the last one open restores the settings."""
        if self.path is None or not self._is_open:
            return
        self._is_open = False
        cls = PersistentCompileCache
        with cls._lock:
            cls._num_open -= 1
            if cls._num_open == 0:
                for name, value in cls._saved.items():
                    jax.config.update(name, value)
