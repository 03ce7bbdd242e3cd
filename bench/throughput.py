"""Offline throughput of jaxserve on the default model, with its baselines in the same run.

Workload A: N requests x P prompt tokens x O output tokens, greedy, ignore_eos: jaxserve vs
  transformers generate() at batch 1 (a few prompts) and at static batch 8.
Workload B: N requests sharing a long prefix with distinct suffixes: prefix caching on vs off.
Workload C: caching on vs off at 0% hits (the cost of caching), interleaved reps, median.
KV usage: peak KV blocks in use vs allocated under a KV-bound load.
COMM: per-step collectives (count and bytes, all-reduces per layer) of the TP step, read from
  the compiled HLO: for --comm-tp (default 8) on a Llama-3-shaped model compiled from shapes
  alone (nothing allocated), and for the benchmarked model at --tensor-parallel-size > 1.
  On CPU the virtual devices come from XLA_FLAGS, set here before jax starts.

Prints a table and writes one JSON record to bench/results/. Ratios, not absolute times, are
what to compare: this machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any


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

from jaxserve import LLM, SamplingParams  # noqa: E402

# Public Llama 3 shapes for the COMM report (bf16, as they would be served on GPUs).
COMM_MODELS = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_q_heads=32),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_layers=80, num_q_heads=64),
}


def run_comm(name: str, tp: int, decode_reqs: int, prefill_tokens: int) -> dict[str, Any]:
    """Collectives of one decode step and one prefill step of a Llama-3-shaped model."""
    from jaxserve.model.spec import ModelSpec
    from jaxserve.runner.hlo_stats import abstract_step_collectives

    spec = ModelSpec(
        architecture="llama",
        vocab_size=128256,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=None,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        **COMM_MODELS[name],
    )
    out: dict[str, Any] = {
        "model": name,
        "tp": tp,
        "note": "bytes as XLA:CPU compiled them: it computes bf16 dots in f32, so its "
        "all-reduces carry f32; a bf16 GPU/TPU step moves half the all-reduce bytes",
    }
    for label, shape in (
        ("decode", (decode_reqs, decode_reqs, 128)),
        ("prefill", (prefill_tokens, 1, 128)),
    ):
        stats = abstract_step_collectives(spec, tp, shape=shape, dtype="bfloat16")
        out[label] = {"bucket_T_R_B": shape, **stats.to_dict()}
    return out


def comm_rows(label: str, comm: dict[str, Any]) -> list[tuple[str, float, str]]:
    rows = []
    for phase in ("decode", "prefill"):
        if phase not in comm:
            continue
        st = comm[phase]
        per_step = ", ".join(
            f"{op} x{n} {st['bytes_per_step'][op] / 2**20:.2f} MiB"
            for op, n in st["count_per_step"].items()
        )
        rows.append(
            (
                f"COMM {label} {phase} T={st['bucket_T_R_B'][0]}",
                float("nan"),
                f"all-reduces/layer {st['per_layer'].get('all-reduce', 0)}; per step: {per_step}",
            )
        )
    return rows


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Stay clear of the special tokens at the bottom of the vocabulary.
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def run_jaxserve(
    prompts: list[list[int]], max_tokens: int, engine_kwargs: dict[str, Any]
) -> dict[str, Any]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    with LLM(**engine_kwargs) as llm:
        startup = time.perf_counter() - t0
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        stats = llm.stats
    ttfts = sorted(o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outs)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "seconds": elapsed,
        "startup_seconds": startup,
        "output_tokens": n_out,
        "output_tok_s": n_out / elapsed,
        "ttft_p50_s": ttfts[len(ttfts) // 2],
        "stats": stats,
        "token_ids": [o.outputs[0].token_ids for o in outs],
    }


def run_attention_ceiling(
    prompts: list[list[int]], max_tokens: int, engine_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Workload A with attention replaced by a no-op: what the rest of the step (weights,
    MLP, lm_head, sampler, host work) allows on this machine. The tokens are garbage; the
    number is the ceiling any attention implementation leaves room under."""
    import jaxserve.model.layers as layers

    real = layers.paged_attention
    layers.paged_attention = lambda q, *args, **kwargs: q  # traced into a fresh engine's jit
    try:
        return run_jaxserve(prompts, max_tokens, engine_kwargs)
    finally:
        layers.paged_attention = real


def run_caching_cost(
    num_requests: int, prompt_len: int, output_len: int, reps: int, engine: dict[str, Any]
) -> dict[str, Any]:
    """Workload C: caching on vs off at 0% hits, both engines alive, runs interleaved.

    Each rep uses fresh random prompts (so nothing hits) and alternates which engine goes
    first; the cost is the median over reps of on-time / off-time - 1, which cancels the
    slow drifts of a noisy machine that two back-to-back single runs do not.
    """
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ratios, same = [], True
    with LLM(**engine) as on, LLM(**{**engine, "enable_prefix_caching": False}) as off:
        for rep in range(reps):
            prompts = [
                {"prompt_token_ids": p}
                for p in random_prompts(num_requests, prompt_len, 49152, seed=100 + rep)
            ]
            times, tokens = {}, {}
            order = [("on", on), ("off", off)] if rep % 2 == 0 else [("off", off), ("on", on)]
            for name, llm in order:
                start = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                times[name] = time.perf_counter() - start
                tokens[name] = [o.outputs[0].token_ids for o in outs]
            ratios.append(times["on"] / times["off"])
            same &= tokens["on"] == tokens["off"]
        hits = on.stats["prefix_cache_hits"]
    ratios.sort()
    return {
        "reps": reps,
        "on_over_off_time": ratios,
        "cost": ratios[len(ratios) // 2] - 1.0,
        "prefix_cache_hits": hits,
        "same_tokens": same,
    }


def run_transformers(
    prompts: list[list[int]], max_tokens: int, batch_size: int, model: Any
) -> dict[str, Any]:
    import torch

    n_out = 0
    start = time.perf_counter()
    token_ids = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            batch = torch.tensor(prompts[i : i + batch_size])
            out = model.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            new = out[:, batch.shape[1] :]
            n_out += new.numel()
            token_ids.extend(new.tolist())
    elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed,
        "output_tokens": n_out,
        "output_tok_s": n_out / elapsed,
        "token_ids": token_ids,
    }


def load_transformers_model() -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from jaxserve.model.builtin import fetch_builtin

    gguf = fetch_builtin("smollm2-135m")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    return model.eval()


def main() -> None:
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
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--data-parallel-size", type=int, default=1)
    ap.add_argument("--comm-tp", type=int, default=8, help="TP size of the COMM report")
    ap.add_argument("--comm-model", default="llama3-8b", choices=sorted(COMM_MODELS))
    ap.add_argument("--skip", default="", help="comma list of A,B,C,KV,HF,CEIL,COMM to skip")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.upper().split(",")))
    vocab = 49152
    engine = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "show_progress": False,
        "tensor_parallel_size": args.tensor_parallel_size,
    }
    if args.data_parallel_size != 1:  # only engines with data parallel know this argument
        engine["data_parallel_size"] = args.data_parallel_size
    record: dict[str, Any] = {
        "bench": "throughput",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": platform.platform(),
        "args": vars(args),
    }
    rows = []
    prompts_a = random_prompts(args.num_requests, args.prompt_len, vocab, seed=0)
    a_len = args.prompt_len + args.output_len
    if "A" not in skip:
        on = run_jaxserve(prompts_a, args.output_len, {**engine, "max_model_len": a_len})
        record["A_jaxserve"] = {k: v for k, v in on.items() if k != "token_ids"}
        rows.append(("A jaxserve", on["output_tok_s"], ""))
        if "HF" not in skip:
            model = load_transformers_model()
            hf1 = run_transformers(prompts_a[: args.hf_batch1_requests], args.output_len, 1, model)
            hf8 = run_transformers(prompts_a[: args.hf_batch8_requests], args.output_len, 8, model)
            record["A_hf_batch1"] = {k: v for k, v in hf1.items() if k != "token_ids"}
            record["A_hf_batch8"] = {k: v for k, v in hf8.items() if k != "token_ids"}
            record["A_vs_hf_batch1"] = on["output_tok_s"] / hf1["output_tok_s"]
            record["A_vs_hf_batch8"] = on["output_tok_s"] / hf8["output_tok_s"]
            same = sum(a == b for a, b in zip(on["token_ids"], hf1["token_ids"], strict=False))
            record["A_greedy_match_hf_batch1"] = f"{same}/{len(hf1['token_ids'])}"
            rows.append(
                (
                    "A transformers batch 1",
                    hf1["output_tok_s"],
                    f"jaxserve {record['A_vs_hf_batch1']:.1f}x (target >= 20x)",
                )
            )
            rows.append(
                (
                    "A transformers static batch 8",
                    hf8["output_tok_s"],
                    f"jaxserve {record['A_vs_hf_batch8']:.1f}x (target >= 4x)",
                )
            )
        if "CEIL" not in skip:
            ceil = run_attention_ceiling(
                prompts_a, args.output_len, {**engine, "max_model_len": a_len}
            )
            record["A_no_attention_ceiling"] = {k: v for k, v in ceil.items() if k != "token_ids"}
            note = "attention a no-op: the ceiling for A on this machine"
            if "A_hf_batch1" in record:
                b1 = ceil["output_tok_s"] / record["A_hf_batch1"]["output_tok_s"]
                b8 = ceil["output_tok_s"] / record["A_hf_batch8"]["output_tok_s"]
                note += f" ({b1:.1f}x batch 1, {b8:.1f}x batch 8)"
            rows.append(("A ceiling (no attention)", ceil["output_tok_s"], note))
    if "C" not in skip:
        c = run_caching_cost(
            args.num_requests,
            args.prompt_len,
            args.c_output_len,
            args.c_reps,
            {**engine, "max_model_len": args.prompt_len + args.c_output_len},
        )
        record["C"] = c
        rows.append(
            (
                "C caching on vs off, 0% hits",
                float("nan"),
                f"cost {c['cost'] * 100:+.1f}% (median of {c['reps']}; target <= 2%)",
            )
        )
    if "B" not in skip:
        rng = random.Random(1)
        prefix = [rng.randrange(100, vocab) for _ in range(args.prefix_len)]
        prompts_b = [
            prefix + [rng.randrange(100, vocab) for _ in range(args.suffix_len)]
            for _ in range(args.num_requests)
        ]
        b_len = args.prefix_len + args.suffix_len + args.prefix_output_len
        b_on = run_jaxserve(prompts_b, args.prefix_output_len, {**engine, "max_model_len": b_len})
        b_off = run_jaxserve(
            prompts_b,
            args.prefix_output_len,
            {**engine, "max_model_len": b_len, "enable_prefix_caching": False},
        )
        record["B_caching_on"] = {k: v for k, v in b_on.items() if k != "token_ids"}
        record["B_caching_off"] = {k: v for k, v in b_off.items() if k != "token_ids"}
        record["B_speedup"] = b_off["seconds"] / b_on["seconds"]
        record["B_same_tokens"] = b_on["token_ids"] == b_off["token_ids"]
        rows.append(("B shared prefix, caching off", b_off["output_tok_s"], ""))
        rows.append(
            (
                "B shared prefix, caching on",
                b_on["output_tok_s"],
                f"{record['B_speedup']:.1f}x faster (target >= 3x)",
            )
        )
    if "KV" not in skip:
        # A load whose total KV need is several times the cache: the scheduler should keep
        # the cache nearly full (and preempt) rather than leave blocks idle.
        kv_prompts = random_prompts(args.num_requests, args.prompt_len, vocab, seed=2)
        block_bytes = 2 * 30 * 16 * 3 * 64 * 4
        kv = run_jaxserve(
            kv_prompts,
            args.output_len,
            {**engine, "max_model_len": a_len, "kv_cache_memory": 161 * block_bytes},
        )
        record["KV"] = {k: v for k, v in kv.items() if k != "token_ids"}
        rows.append(
            (
                "KV-bound load",
                kv["output_tok_s"],
                f"peak usage {kv['stats']['peak_kv_cache_usage'] * 100:.1f}% "
                f"(target >= 90%), preemptions {kv['stats']['num_preemptions']}",
            )
        )
    if "COMM" not in skip:
        comm = run_comm(
            args.comm_model, args.comm_tp, args.max_num_seqs, args.max_num_batched_tokens
        )
        record["COMM"] = comm
        rows += comm_rows(f"{args.comm_model} TP={args.comm_tp}", comm)
        if args.tensor_parallel_size > 1:
            from jaxserve.runner.hlo_stats import collective_stats

            with LLM(**{**engine, "max_model_len": a_len, "enable_warmup": False}) as llm:
                runner = llm.engine.core.runner
                own = {"model": "default", "tp": args.tensor_parallel_size}
                for phase, shape in (
                    ("decode", runner.buckets.select(args.max_num_seqs, 1)),
                    ("prefill", runner.buckets.select(args.max_num_batched_tokens, 1)),
                ):
                    stats = collective_stats(
                        runner.compiled_step_text(shape), runner.spec.num_layers
                    )
                    own[phase] = {"bucket_T_R_B": shape, **stats.to_dict()}
            record["COMM_own_model"] = own
            rows += comm_rows(f"default TP={args.tensor_parallel_size}", own)
    print(f"\n{'workload':<34} {'output tok/s':>12}  note")
    for name, tps, note in rows:
        print(f"{name:<34} {tps:>12.1f}  {note}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
