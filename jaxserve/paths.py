"""Where jaxserve keeps downloaded models and compiled programs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$JAXSERVE_CACHE, else $XDG_CACHE_HOME/jaxserve, else ~/.cache/jaxserve."""
    if env := os.environ.get("JAXSERVE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jaxserve"
