"""jaxserve: a pure-JAX LLM inference engine (paged KV cache, continuous batching).

Names are imported lazily so that host-only modules (jaxserve.core) load without jax.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "jaxserve.llm",
    "EngineArgs": "jaxserve.config",
    "SamplingParams": "jaxserve.sampling_params",
    "RequestOutput": "jaxserve.outputs",
    "CompletionOutput": "jaxserve.outputs",
    "Logprob": "jaxserve.outputs",
    "RequestOutputKind": "jaxserve.outputs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
