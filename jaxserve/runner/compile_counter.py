"""CompileCounter: how many XLA programs this process lowered while the counter was open.

Each lowering is a program compiled, or fetched from the persistent cache; the runner reads the
count around every step (and the embed queue around every slice) to tell a compile after
warmup. The counter is an object with a lifetime rather than a listener registered at import:
it registers with jax.monitoring when made and unregisters on close(), so importing jaxserve
changes nothing in the process, and a closed engine leaves no listener behind.

NOTE: jax.monitoring is process-wide, so two open counters (two engines in one process) each
see the other's compiles too. Engines in one process compile one at a time in practice (the
offline LLM, the tests), and the count is a regression signal, not an exact attribution.
"""

from __future__ import annotations

import threading

import jax

# the jax.monitoring event emitted once per jaxpr lowered to an MLIR module
_LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


class CompileCounter:
    def __init__(self) -> None:
        # lowerings seen since this counter was made
        self.count = 0
        self._lock = threading.Lock()
        self._closed = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs: object) -> None:
        if event == _LOWERING_EVENT:
            with self._lock:
                self.count += 1

    def close(self) -> None:
        """Unregisters the listener (idempotent); the count stays readable."""
        if not self._closed:
            self._closed = True
            jax.monitoring.unregister_event_duration_listener(self._on_event)
