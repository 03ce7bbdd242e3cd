"""Data parallel: replicas on disjoint device slices serve like one engine, and share a burst.

The checks run in a subprocess with 8 host devices (the flag must be set before jax starts,
and this pytest process started it long ago).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_dp_check(model: str, tp: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "tests.parallel.dp_check", model, str(tp)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(result: dict, tp: int) -> None:
    # The same greedy tokens as one engine, offline and through the engine-core process.
    assert result["offline"] == result["one"]
    assert result["server"] == result["one"]
    # Each replica on its own tp devices, disjoint and contiguous.
    assert result["devices"] == [list(range(tp)), list(range(tp, 2 * tp))]
    # A burst of 8 distinct prompts is spread over both replicas (4 and 4: see the router).
    assert result["offline_routed"] == [4, 4]
    assert result["is_core_interface"]
    # Probes count too on the server side (one per replica), so both replicas served at least
    # four requests each.
    assert min(result["server_routed"]) >= 4
    assert result["health"] == "ok"
    assert result["leaked_blocks"] == [0, 0]


def test_dp2_tp4_tiny_model(tiny_model_dir: Path) -> None:
    check(run_dp_check(str(tiny_model_dir), 4), 4)


@pytest.mark.slow
def test_dp2_tp3_default_model(smollm2_gguf: Path) -> None:
    check(run_dp_check("smollm2-135m", 3), 3)
