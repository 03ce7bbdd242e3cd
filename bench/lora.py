"""Multi-LoRA throughput: workload A on no adapter, one adapter, and eight, in one run.

Workload A (bench/throughput.py's shape) on the default model: N requests x P prompt tokens x
O output tokens, greedy, ignore_eos (every request makes exactly O tokens). Two engines, built
once and measured in interleaved reps (median):
- "disabled": LoRA off (the base model's program);
- "none": LoRA on (max_loras=8, max_lora_rank=16), no request on an adapter;
- "one": every request on one adapter; "eight": requests spread round-robin over 8 adapters.
Every adapter is rank 16 on all 7 targets, random, in the PEFT file format (written here with
numpy + safetensors, read by the engine as any PEFT adapter is).
Targets: eight >= 0.8x disabled; none within 2% of disabled; a hot load of a 9th rank-16
adapter (read from disk + written into a device slot, evicting one) < 1 s with 0 compiles.

Prints a table and writes one JSON record to bench/results/. Ratios, not absolute times, are
what to compare: this machine is noisy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.save import save_record  # noqa: E402
from jaxserve import LLM, SamplingParams  # noqa: E402
from jaxserve.lora.request import LoRARequest  # noqa: E402
from jaxserve.model.spec import ModelSpec  # noqa: E402
from tests.lora.random_adapter import write_random_adapter  # noqa: E402


def write_adapter(path: Path, spec: ModelSpec, rank: int, seed: int) -> Path:
    """A random rank-`rank` PEFT adapter on all 7 projections of `spec`."""
    return write_random_adapter(
        path,
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        q_size=spec.num_q_heads * spec.head_dim,
        kv_size=spec.num_kv_heads * spec.head_dim,
        rank=rank,
        seed=seed,
    )


def prompts(n: int, length: int) -> list[dict[str, list[int]]]:
    # the same text prompt, cut to `length` tokens, then made distinct by its last token
    base = [504, 3458, 282, 4649, 314, 253, 7042, 1078, 30, 198] * (length // 10 + 1)
    return [{"prompt_token_ids": base[: length - 1] + [1000 + i]} for i in range(n)]


def run(llm: LLM, batch: list[dict[str, list[int]]], params: SamplingParams, loras: list) -> dict:
    start = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False, lora_request=loras)
    elapsed = time.perf_counter() - start
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": elapsed, "output_tokens": n_out, "output_tok_s": n_out / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    engine: dict[str, Any] = dict(
        max_model_len=args.prompt_len + args.output_len + 16,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        show_progress=False,
    )
    batch = prompts(args.num_requests, args.prompt_len)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    results: dict[str, Any] = {"args": vars(args), "machine": platform.platform()}
    runs: dict[str, list[dict]] = {"disabled": [], "none": [], "one": [], "eight": []}
    with tempfile.TemporaryDirectory() as tmp, LLM(**engine) as base:
        with LLM(**engine, enable_lora=True, max_loras=8, max_lora_rank=args.rank) as llm:
            core = llm.engine.core
            spec = core.spec
            adapters = [
                LoRARequest(
                    f"a{i}",
                    i + 1,
                    str(write_adapter(Path(tmp) / f"a{i}", spec, args.rank, i)),
                )
                for i in range(9)
            ]
            n = args.num_requests
            mixes = {
                "none": [None] * n,
                "one": [adapters[0]] * n,
                "eight": [adapters[i % 8] for i in range(n)],
            }
            for rep in range(args.reps + 1):  # rep 0 reads the adapters and warms up
                if rep == 1:
                    compiles0 = core.num_compiles_after_warmup
                r = run(base, batch, params, [None] * n)
                if rep:
                    runs["disabled"].append(r)
                for name, loras in mixes.items():
                    r = run(llm, batch, params, loras)
                    if rep:
                        runs[name].append(r)
            results["compiles_in_measured_reps"] = core.num_compiles_after_warmup - compiles0
            # hot load: a 9th adapter, read from disk and written into a slot (evicting one)
            compiles0 = core.num_compiles_after_warmup
            t0 = time.perf_counter()
            core.add_lora(adapters[8])
            t1 = time.perf_counter()
            core.lora.prepare([adapters[8].lora_int_id], running=set())
            jax_block(core)
            t2 = time.perf_counter()
            results["hot_load"] = {
                "read_seconds": t1 - t0,
                "slot_write_seconds": t2 - t1,
                "total_seconds": t2 - t0,
                "compiles": core.num_compiles_after_warmup - compiles0,
                "slot_evictions": core.lora.stats.num_slot_evictions,
            }
    med = {k: statistics.median(r["output_tok_s"] for r in v) for k, v in runs.items()}
    results["runs"] = runs
    results["median_output_tok_s"] = med
    results["ratio_vs_disabled"] = {k: med[k] / med["disabled"] for k in ("none", "one", "eight")}
    print(f"{'mix':>10} {'out tok/s':>10} {'vs disabled':>12}")
    for k in runs:
        print(f"{k:>10} {med[k]:10.1f} {med[k] / med['disabled']:12.3f}")
    ratios = results["ratio_vs_disabled"]
    print(f"none vs disabled: {ratios['none']:.3f} (target >= 0.98)")
    print(f"eight vs disabled: {ratios['eight']:.3f} (target >= 0.8)")
    hl = results["hot_load"]
    print(
        f"hot load of a rank-{args.rank} adapter: {hl['total_seconds']:.3f} s "
        f"(read {hl['read_seconds']:.3f} s, slot write {hl['slot_write_seconds']:.3f} s), "
        f"{hl['compiles']} compiles (target < 1 s, 0 compiles)"
    )
    print(f"compiles in the measured reps: {results['compiles_in_measured_reps']}")
    save_record(results, args.out, "lora")


def jax_block(core: Any) -> None:
    import jax

    jax.block_until_ready(core.runner.lora_slots.stacks)


if __name__ == "__main__":
    main()
