"""Structured output throughput: workload A with 0%, 50% and 100% of requests under a JSON schema.

Workload A (bench/throughput.py's shape): N requests x P prompt tokens x O output tokens on the
default model. The constrained requests follow a mid-size JSON schema that is never complete
within O tokens (an array of at least 200 short records), so every request generates exactly
O tokens and the runs produce the same amount of output. Reported, all in one run:
- output tok/s of each mix, and its ratio to the 0% run (target: 100% >= 0.9x);
- the 0% run against "today": the same engine with the token-bitmask input switched off, i.e.
  the step as it was before structured output (target: within 2%). Interleaved reps, median.
- the host bitmask fill: seconds per step that had a constrained row, the share of the
  step's wall time it takes, and the share of fills hidden behind the device: the fill runs
  after the step's forward is dispatched (runner.sample), and a fill counts as hidden when
  that forward was still running when the fill ended (ModelRunner.num_mask_fills_hidden).

Prints a table and writes one JSON record to bench/results/. Ratios, not absolute times, are
what to compare: this machine is noisy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.save import save_record  # noqa: E402
from jaxserve import LLM, SamplingParams  # noqa: E402
from jaxserve.structured_output.params import StructuredOutputsParams  # noqa: E402

RECORD = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "maxLength": 12},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "name", "tags", "ok"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"records": {"type": "array", "items": RECORD, "minItems": 200}},
    "required": ["records"],
    "additionalProperties": False,
}


def prompts(n: int, length: int) -> list[dict[str, list[int]]]:
    # the same text prompt, cut to `length` tokens, then made distinct by its last token
    base = [504, 3458, 282, 4649, 314, 253, 7042, 1078, 30, 198] * (length // 10 + 1)
    return [{"prompt_token_ids": base[: length - 1] + [1000 + i]} for i in range(n)]


def params_for(fraction: float, n: int, output_len: int) -> list[SamplingParams]:
    constrained = round(fraction * n)
    so = StructuredOutputsParams(json=SCHEMA)
    # unconstrained rows ignore eos so they too generate exactly output_len tokens
    plain = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    json_p = SamplingParams(temperature=0.0, max_tokens=output_len, structured_outputs=so)
    # spread the constrained requests over the batch
    return [
        json_p if (i * constrained) // n != ((i + 1) * constrained) // n else plain
        for i in range(n)
    ]


def run(llm: LLM, batch: list[dict[str, list[int]]], params: list[SamplingParams]) -> dict:
    core = llm.engine.core
    steps0, step_s0 = core.num_steps, core.step_seconds_total
    masks = core.token_masks
    fill0 = masks.manager.stats.total_s if masks._manager is not None else 0.0
    fills0 = masks.manager.stats.num_fills if masks._manager is not None else 0
    runner = core.runner
    mask_steps0, hidden0 = runner.num_mask_fills, runner.num_mask_fills_hidden
    start = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    fill_s = (masks.manager.stats.total_s - fill0) if masks._manager is not None else 0.0
    fills = (masks.manager.stats.num_fills - fills0) if masks._manager is not None else 0
    steps = core.num_steps - steps0
    mask_steps = runner.num_mask_fills - mask_steps0
    hidden = runner.num_mask_fills_hidden - hidden0
    return {
        "seconds": elapsed,
        "output_tokens": n_out,
        "output_tok_s": n_out / elapsed,
        "steps": steps,
        "step_seconds": core.step_seconds_total - step_s0,
        "fill_seconds": fill_s,
        "fill_steps": fills,
        "fill_ms_per_step": 1000 * fill_s / fills if fills else 0.0,
        "mask_steps": mask_steps,
        "mask_fills_hidden": hidden,
        "hidden_share": hidden / mask_steps if mask_steps else None,
        "finish_reasons": sorted({o.outputs[0].finish_reason for o in outs}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    engine = dict(
        max_model_len=args.prompt_len + args.output_len + 16,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        show_progress=False,
    )
    batch = prompts(args.num_requests, args.prompt_len)
    mixes = {f: params_for(f, args.num_requests, args.output_len) for f in (0.0, 0.5, 1.0)}
    results: dict[str, Any] = {"args": vars(args), "machine": platform.platform()}
    runs: dict[str, list[dict]] = {"today_0": [], "0": [], "50": [], "100": []}
    with LLM(**engine) as llm:
        # "today": the same engine with the bitmask input off (no token-mask input, no cond)
        runner = llm.engine.core.runner
        width = runner.bitmask_width
        core = llm.engine.core
        for rep in range(args.reps + 1):  # rep 0 warms the grammar cache and the buckets
            if rep == 1:  # ("today" compiles its own programs in rep 0)
                compiles0 = core.num_compiles_after_warmup
            for name in ("today_0", "0", "50", "100"):
                runner.bitmask_width = None if name == "today_0" else width
                frac = 0.0 if name == "today_0" else int(name) / 100
                r = run(llm, batch, mixes[frac])
                if rep:
                    runs[name].append(r)
        runner.bitmask_width = width
        results["compiles_in_measured_reps"] = core.num_compiles_after_warmup - compiles0
    med = {k: statistics.median(r["output_tok_s"] for r in v) for k, v in runs.items()}
    results["runs"] = runs
    results["median_output_tok_s"] = med
    results["ratio_vs_0"] = {k: med[k] / med["0"] for k in ("50", "100")}
    results["ratio_0_vs_today"] = med["0"] / med["today_0"]
    full = runs["100"]
    results["fill_share_of_step_time_100"] = statistics.median(
        r["fill_seconds"] / r["step_seconds"] for r in full
    )
    results["fills_hidden_share_100"] = sum(r["mask_fills_hidden"] for r in full) / max(
        1, sum(r["mask_steps"] for r in full)
    )
    print(f"{'mix':>10} {'out tok/s':>10} {'ratio':>7} {'fill ms/step':>13} {'hidden':>7}")
    for k in ("today_0", "0", "50", "100"):
        fill = statistics.median(r["fill_ms_per_step"] for r in runs[k])
        hid = sum(r["mask_fills_hidden"] for r in runs[k]) / max(
            1, sum(r["mask_steps"] for r in runs[k])
        )
        print(f"{k:>10} {med[k]:10.1f} {med[k] / med['0']:7.3f} {fill:13.2f} {hid:7.2f}")
    print(f"0% vs today: {results['ratio_0_vs_today']:.3f} (target >= 0.98)")
    print(f"100% vs 0%: {results['ratio_vs_0']['100']:.3f} (target >= 0.9)")
    print(f"fill share of step time at 100%: {results['fill_share_of_step_time_100']:.3f}")
    print(f"fills hidden behind the forward at 100%: {results['fills_hidden_share_100']:.3f}")
    print(f"compiles in the measured reps: {results['compiles_in_measured_reps']}")
    save_record(results, args.out, "structured")


if __name__ == "__main__":
    main()
