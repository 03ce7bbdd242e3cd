"""scripts/device_check.sh --dry-run: every stage of the accelerator check runs on CPU at its
smallest size and reports ok in one JSON, so the check cannot rot before a device is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["setup", "kernel_tests", "engine_tiny", "engine_8b", "bench_kernels", "workload_a"]


def _check(
    out: Path, *args: str, timeout: float, dry_run: bool = True
) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", "scripts/device_check.sh", *(["--dry-run"] * dry_run), "--out", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    path = Path(proc.stdout.strip().splitlines()[-1])  # the JSON's path is the last line
    assert path.parent == out and path.is_file(), proc.stdout + proc.stderr
    return proc, json.loads(path.read_text())


@pytest.mark.slow
def test_dry_run_runs_every_stage_ok(tmp_path):
    proc, record = _check(tmp_path, timeout=600)
    stages = record["stages"]
    assert list(stages) == STAGES
    # engine_8b's function (_engine_stage) is engine_tiny's; the dry run runs it once
    assert stages.pop("engine_8b")["status"] == "skipped"
    assert {n: s["status"] for n, s in stages.items()} == dict.fromkeys(stages, "ok"), {
        n: s.get("error") for n, s in stages.items()
    }
    assert proc.returncode == 0 and record["dry_run"] is True
    assert stages["setup"]["result"]["backend"] == "cpu"
    kernel_tests = stages["kernel_tests"]["result"]
    assert kernel_tests["mode"] == "interpret" and kernel_tests["summary"]["failures"] == 0
    assert kernel_tests["summary"]["passed"] >= 2
    # pallas (the TPU kernel, interpreted) and xla agree in float32 on the same dummy weights
    tiny = stages["engine_tiny"]["result"]
    assert tiny["model"] == "dummy:tiny" and tiny["agreement"]["tokens_equal"] is True
    assert tiny["agreement"]["max_abs_logprob_diff"] < 1e-4
    for backend in ("xla", "pallas"):
        run = tiny[backend]
        assert f"attention_backend='{backend}'" in run["engine"]
        assert run["repeats_first_run"] and run["output_tok_s"] > 0
        assert run["output_tokens"] == 2 * 2  # the dry run's 2 prompts x 2 tokens
    kernels = stages["bench_kernels"]["result"]["record"]["results"]
    assert kernels and all(r["correct"] for r in kernels)
    a = stages["workload_a"]["result"]["record"]["A_jaxserve"]
    assert a["output_tokens"] == 2 * 4 and a["stats"]["num_compiles_after_warmup"] == 0


def test_a_stage_past_the_budget_is_killed_and_recorded(tmp_path):
    # bench_kernels at its device size (not the dry run's: that one took 3.9 s here with a warm
    # compile cache) needs far more than 6 s on a CPU: it is killed (with the bench it
    # started), marked timeout, and the stage after it is still recorded (skipped: no budget).
    proc, record = _check(
        tmp_path,
        "--only",
        "bench_kernels,workload_a",
        "--budget-s",
        "6",
        timeout=120,
        dry_run=False,
    )
    stages = record["stages"]
    assert stages["bench_kernels"]["status"] == "timeout"
    assert stages["bench_kernels"]["seconds"] < 30
    assert stages["workload_a"] == {"status": "skipped", "reason": "the budget is spent"}
    assert proc.returncode == 1
    assert not _processes_naming(tmp_path)  # bench/kernels.py --out <tmp_path/...> is gone


def _processes_naming(path: Path) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended while we looked
            continue
        if str(path) in text:
            found.append(text)
    return found
