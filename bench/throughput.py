"""Offline throughput of jaxserve on the default model, with its baselines in the same run.

Rows (--skip takes a comma list of their names):
A / A16: N requests x P prompt tokens x O output tokens, greedy, ignore_eos, in float32 / in
  bfloat16 (with both, the FLOP/s of one bf16 and one f32 jnp.dot: what bf16 can gain on this
  CPU); HF: transformers generate() at batch 1 (a few prompts) and static batch 8.
CEIL / CEIL16: workload A (f32 / bf16) with attention a no-op: the ceiling for A.
BREAKDOWN: A's decode step (N requests at ~P + O/2 context) split into dense, attention and
  host, and attention and its gather floor (copying the step's KV alone) against the KV-bytes
  roofline at the read bandwidth measured here (bench/decode_breakdown.py).
PREFILL: one --prefill-len prompt alone (max_tokens=1): prefill tok/s from its time to first
  token, against the same with attention a no-op (both engines alive, reps alternated).
HOST: host microseconds per request per step on a null model at --host-requests concurrent
  decodes (bench/host_overhead.py).
B: N requests sharing a long prefix with distinct suffixes: prefix caching on vs off.
C: caching on vs off at 0% hits (the cost of caching), interleaved reps, median.
KV: peak KV blocks in use vs allocated under a KV-bound load.
COMM: per-step collectives of the TP step from the compiled HLO (bench/comm.py): for
  --comm-tp (default 8) on a Llama-3-shaped model compiled from shapes alone, and for the
  benchmarked model at --tensor-parallel-size > 1. On CPU the virtual devices come from
  XLA_FLAGS, set here before jax starts.

Prints a table, then the speed issue's targets and whether each is met (bench/targets.py),
and writes one JSON record to bench/results/. Ratios, not absolute times, are what to
compare: this machine is noisy.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from typing import Any

ROWS = ("A", "A16", "HF", "CEIL", "CEIL16", "BREAKDOWN", "PREFILL", "HOST", "B", "C", "KV", "COMM")


def _set_virtual_cpu_devices(argv: list[str]) -> None:
    """XLA reads the host device count once, at start-up: enough for TP x DP and COMM."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--tensor-parallel-size", type=int, default=1)
    pre.add_argument("--data-parallel-size", type=int, default=1)
    pre.add_argument("--comm-tp", type=int, default=8)
    pre.add_argument("--skip", default="")
    ns, _ = pre.parse_known_args(argv)
    comm = 0 if "COMM" in ns.skip.upper().split(",") else ns.comm_tp
    n = max(ns.tensor_parallel_size * ns.data_parallel_size, comm)
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


if __name__ == "__main__":
    _set_virtual_cpu_devices(sys.argv[1:])

# After XLA_FLAGS: these import jax.
from comm import COMM_MODELS, comm_rows, run_comm, run_comm_own  # noqa: E402
from decode_breakdown import StepProbe, breakdown_rows, dot_rate, read_bandwidth  # noqa: E402
from host_overhead import host_rows, run_host_overhead  # noqa: E402
from save import save_record  # noqa: E402
from targets import check_targets, print_targets  # noqa: E402
from workloads import (  # noqa: E402
    VOCAB,
    load_transformers_model,
    random_prompts,
    run_attention_ceiling,
    run_caching_cost,
    run_jaxserve,
    run_prefill_pair,
    run_transformers,
    without_token_ids,
)

Row = tuple[str, float, str]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-batch1-requests", type=int, default=8)
    ap.add_argument("--hf-batch8-requests", type=int, default=16)
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--suffix-len", type=int, default=32)
    ap.add_argument("--prefix-output-len", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--c-reps", type=int, default=5)
    ap.add_argument("--c-output-len", type=int, default=32)
    ap.add_argument("--breakdown-reps", type=int, default=10, help="timed calls per step")
    ap.add_argument("--bw-mib", type=int, default=1024, help="array read for the bandwidth")
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--prefill-reps", type=int, default=6, help="PREFILL: best of, each")
    ap.add_argument("--host-requests", type=int, default=256)
    ap.add_argument("--host-prompt-len", type=int, default=16)
    ap.add_argument("--host-output-len", type=int, default=64)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--data-parallel-size", type=int, default=1)
    ap.add_argument("--comm-tp", type=int, default=8, help="TP size of the COMM report")
    ap.add_argument("--comm-model", default="llama3-8b", choices=sorted(COMM_MODELS))
    ap.add_argument("--skip", default="", help=f"comma list of {','.join(ROWS)} to skip")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    args.skip = set(filter(None, args.skip.upper().split(",")))
    if args.skip - set(ROWS):
        ap.error(f"--skip: unknown rows {sorted(args.skip - set(ROWS))}; known: {ROWS}")
    return args


def workload_a(args: argparse.Namespace, engine: dict[str, Any], record: dict[str, Any]) -> list:
    """A and A16, their CEIL rows, the HF baselines and the decode-step breakdowns."""
    rows: list[Row] = []
    skip = args.skip
    prompts = random_prompts(args.num_requests, args.prompt_len, VOCAB, seed=0)
    a_engine = {**engine, "max_model_len": args.prompt_len + args.output_len}
    bandwidth = None
    if "BREAKDOWN" not in skip and not skip >= {"A", "A16"}:
        record["read_bandwidth"] = read_bandwidth(args.bw_mib * 2**20)
        bandwidth = record["read_bandwidth"]["bytes_per_s"]
        rows.append(("read bandwidth (jnp.sum)", float("nan"), f"{bandwidth / 1e9:.1f} GB/s"))
    for dtype, a_name, ceil_name, tag in (
        ("float32", "A", "CEIL", "f32"),
        ("bfloat16", "A16", "CEIL16", "bf16"),
    ):
        kwargs = {**a_engine, "dtype": dtype}
        if a_name not in skip:
            probe = None
            if bandwidth is not None:
                probe = StepProbe(args.num_requests, args.breakdown_reps, bandwidth)
            run = run_jaxserve(prompts, args.output_len, kwargs, probe=probe)
            record[f"{a_name}_jaxserve"] = without_token_ids(run)
            record.setdefault("A_token_ids", {})[tag] = run["token_ids"]
            rows.append((f"A jaxserve {tag}", run["output_tok_s"], ""))
            if probe is not None:
                record.setdefault("BREAKDOWN", {})[tag] = run.pop("probe")
                rows += breakdown_rows(tag, record["BREAKDOWN"][tag])
        if ceil_name not in skip:
            ceil = run_attention_ceiling(prompts, args.output_len, kwargs)
            record[f"{ceil_name}_no_attention"] = without_token_ids(ceil)
            note = ""
            if f"{a_name}_jaxserve" in record:
                ratio = record[f"{a_name}_jaxserve"]["output_tok_s"] / ceil["output_tok_s"]
                record[f"{a_name}_over_CEIL"] = ratio
                note = f"A {tag} / CEIL {ratio:.2f}x"
                if tag == "f32":
                    note += " (target >= 0.8x)"
            rows.append((f"A ceiling {tag} (no attention)", ceil["output_tok_s"], note))
    if "A_jaxserve" in record and "A16_jaxserve" in record:
        ratio = record["A16_jaxserve"]["output_tok_s"] / record["A_jaxserve"]["output_tok_s"]
        record["A16_over_A"] = ratio
        ids = record["A_token_ids"]
        same = sum(a == b for a, b in zip(ids["f32"], ids["bf16"], strict=True))
        record["A16_greedy_match_A"] = f"{same}/{len(ids['f32'])}"
        rows.append(
            (
                "A bf16 / A f32",
                float("nan"),
                f"{ratio:.2f}x (target >= 1.5x); same greedy tokens {same}/{len(ids['f32'])}",
            )
        )
        # what bf16 can gain on this CPU at all: its dots alone, same shape as the issue's
        rates = {dtype: dot_rate(dtype) for dtype in ("float32", "bfloat16")}
        record["dot_flop_per_s"] = rates
        rows.append(
            (
                "dot 512x576x1536 bf16 / f32",
                float("nan"),
                f"{rates['bfloat16'] / rates['float32']:.2f}x ({rates['bfloat16'] / 1e9:.0f} vs"
                f" {rates['float32'] / 1e9:.0f} GFLOP/s, f32 accumulation)",
            )
        )
    if "A" not in skip and "HF" not in skip:
        rows += hf_baselines(args, prompts, record)
    record.pop("A_token_ids", None)
    return rows


def hf_baselines(args: argparse.Namespace, prompts: list[list[int]], record: dict) -> list[Row]:
    model = load_transformers_model()
    hf1 = run_transformers(prompts[: args.hf_batch1_requests], args.output_len, 1, model)
    hf8 = run_transformers(prompts[: args.hf_batch8_requests], args.output_len, 8, model)
    record["A_hf_batch1"] = without_token_ids(hf1)
    record["A_hf_batch8"] = without_token_ids(hf8)
    a = record["A_jaxserve"]["output_tok_s"]
    ids = record["A_token_ids"]["f32"]
    same = sum(x == y for x, y in zip(ids, hf1["token_ids"], strict=False))
    record["A_greedy_match_hf_batch1"] = f"{same}/{len(hf1['token_ids'])}"
    x1, x8 = a / hf1["output_tok_s"], a / hf8["output_tok_s"]
    record["A_vs_hf_batch1"], record["A_vs_hf_batch8"] = x1, x8
    return [
        ("A transformers batch 1", hf1["output_tok_s"], f"jaxserve f32 {x1:.1f}x"),
        ("A transformers static batch 8", hf8["output_tok_s"], f"jaxserve f32 {x8:.1f}x"),
    ]


def prefill_row(args: argparse.Namespace, engine: dict[str, Any], record: dict) -> list[Row]:
    pair = run_prefill_pair(args.prefill_len, args.prefill_reps, engine)
    real, free = pair["real"], pair["no_attention"]
    ratio = real["prefill_tok_s"] / free["prefill_tok_s"]
    record["PREFILL"] = {"real": real, "no_attention": free, "ratio": ratio}
    return [
        (f"PREFILL {args.prefill_len}-token prompt, no attention", free["prefill_tok_s"], ""),
        (
            f"PREFILL {args.prefill_len}-token prompt",
            real["prefill_tok_s"],
            f"{ratio:.2f}x of no attention (target >= 0.7x); prefill tok/s",
        ),
    ]


def workload_b(args: argparse.Namespace, engine: dict[str, Any], record: dict) -> list[Row]:
    rng = random.Random(1)
    prefix = [rng.randrange(100, VOCAB) for _ in range(args.prefix_len)]
    prompts = [
        prefix + [rng.randrange(100, VOCAB) for _ in range(args.suffix_len)]
        for _ in range(args.num_requests)
    ]
    b_len = args.prefix_len + args.suffix_len + args.prefix_output_len
    b_engine = {**engine, "max_model_len": b_len}
    b_on = run_jaxserve(prompts, args.prefix_output_len, b_engine)
    b_off = run_jaxserve(
        prompts, args.prefix_output_len, {**b_engine, "enable_prefix_caching": False}
    )
    record["B_caching_on"] = without_token_ids(b_on)
    record["B_caching_off"] = without_token_ids(b_off)
    record["B_speedup"] = b_off["seconds"] / b_on["seconds"]
    record["B_same_tokens"] = b_on["token_ids"] == b_off["token_ids"]
    return [
        ("B shared prefix, caching off", b_off["output_tok_s"], ""),
        (
            "B shared prefix, caching on",
            b_on["output_tok_s"],
            f"{record['B_speedup']:.1f}x faster (target >= 3x)",
        ),
    ]


def kv_row(args: argparse.Namespace, engine: dict[str, Any], record: dict) -> list[Row]:
    # A load whose total KV need is several times the cache: the scheduler should keep the
    # cache nearly full (and preempt) rather than leave blocks idle.
    prompts = random_prompts(args.num_requests, args.prompt_len, VOCAB, seed=2)
    block_bytes = 2 * 30 * 16 * 3 * 64 * 4
    kv = run_jaxserve(
        prompts,
        args.output_len,
        {
            **engine,
            "max_model_len": args.prompt_len + args.output_len,
            "kv_cache_memory": 161 * block_bytes,
        },
    )
    record["KV"] = without_token_ids(kv)
    return [
        (
            "KV-bound load",
            kv["output_tok_s"],
            f"peak usage {kv['stats']['peak_kv_cache_usage'] * 100:.1f}% "
            f"(target >= 90%), preemptions {kv['stats']['num_preemptions']}",
        )
    ]


def main() -> None:
    args = parse_args()
    skip = args.skip
    engine = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "show_progress": False,
        "tensor_parallel_size": args.tensor_parallel_size,
    }
    if args.data_parallel_size != 1:  # only engines with data parallel know this argument
        engine["data_parallel_size"] = args.data_parallel_size
        # the probes wrap an in-process runner; data parallel replicas have none
        skip |= {"BREAKDOWN", "HOST"}
    record: dict[str, Any] = {
        "bench": "throughput",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": platform.platform(),
        "args": {**vars(args), "skip": sorted(skip)},
    }
    rows = workload_a(args, engine, record)
    if "PREFILL" not in skip:
        rows += prefill_row(args, engine, record)
    if "HOST" not in skip:
        record["HOST"] = run_host_overhead(
            args.host_requests,
            args.host_prompt_len,
            args.host_output_len,
            args.breakdown_reps,
            engine,
        )
        rows += host_rows(record["HOST"])
    if "C" not in skip:
        c = run_caching_cost(
            args.num_requests,
            args.prompt_len,
            args.c_output_len,
            args.c_reps,
            {**engine, "max_model_len": args.prompt_len + args.c_output_len},
        )
        record["C"] = c
        note = f"cost {c['cost'] * 100:+.1f}% (median of {c['reps']}; target <= 2%)"
        rows.append(("C caching on vs off, 0% hits", float("nan"), note))
    if "B" not in skip:
        rows += workload_b(args, engine, record)
    if "KV" not in skip:
        rows += kv_row(args, engine, record)
    if "COMM" not in skip:
        comm = run_comm(
            args.comm_model, args.comm_tp, args.max_num_seqs, args.max_num_batched_tokens
        )
        record["COMM"] = comm
        rows += comm_rows(f"{args.comm_model} TP={args.comm_tp}", comm)
        if args.tensor_parallel_size > 1:
            own = run_comm_own(
                {**engine, "max_model_len": args.prompt_len + args.output_len},
                args.max_num_seqs,
                args.max_num_batched_tokens,
            )
            record["COMM_own_model"] = own
            rows += comm_rows(f"default TP={args.tensor_parallel_size}", own)
    print(f"\n{'workload':<44} {'output tok/s':>12}  note")
    for name, tps, note in rows:
        print(f"{name:<44} {tps:>12.1f}  {note}")
    record["targets"] = check_targets(record)
    print_targets(record["targets"])
    print()
    save_record(record, args.out, "throughput")


if __name__ == "__main__":
    main()
