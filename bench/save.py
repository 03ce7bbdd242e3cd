"""Where every bench's JSON record goes: one file per run, named by bench and time."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def save_record(record: dict[str, Any], out: str | Path, name: str) -> Path:
    """Writes `record` to `out`/`name`-<YYYYmmdd-HHMMSS>.json (the folder made if missing;
    values JSON cannot hold written as their str), prints and returns the path."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    print(f"wrote {path}")
    return path
