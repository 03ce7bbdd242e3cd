"""The sampler's top-k / top-p filter: ranked candidates against the full-vocab sort.

Two parts, one run, printed and saved as one JSON record under bench/results/:
- the filter alone, jitted, on [R, V] f32 logits (R in --rows, V = SmolLM2's vocab), with the
  default candidates and with the candidates set to the whole vocab (the full sort: the
  filter as it was before candidates);
- the default model end to end: --num-requests requests x --output-len tokens at temperature
  1, plain and with top_p / top_k, on an engine with the default candidates and on one whose
  filter always sorts, reps alternating between them. The cost of a filter is its tok/s
  against the plain run of the same engine.
Ratios, not absolute times, are what to compare: this machine is noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxserve.runner.top_k_top_p as top_k_top_p  # noqa: E402
from bench.save import save_record  # noqa: E402
from bench.timing import timed  # noqa: E402
from bench.workloads import VOCAB, progress, random_prompts  # noqa: E402
from jaxserve import LLM, SamplingParams  # noqa: E402

FILTERS = {
    "plain": {},
    "top_p 0.95": {"top_p": 0.95},
    "top_p 0.9, top_k 50": {"top_p": 0.9, "top_k": 50},
}


@contextlib.contextmanager
def always_sorted() -> Iterator[None]:
    """The filter sorts the whole vocab for every step traced inside (the engine traces its
    steps at start-up, so an engine made inside keeps it for life)."""
    saved = top_k_top_p.TOP_CANDIDATES
    top_k_top_p.TOP_CANDIDATES = 1 << 30
    try:
        yield
    finally:
        top_k_top_p.TOP_CANDIDATES = saved


def best_ms(fn: Any, *args: Any, reps: int) -> float:
    return min(timed(lambda: fn(*args), reps)) * 1e3


def float64_kept(logits: np.ndarray, top_p: float) -> np.ndarray:
    """bool[V]: the minimal nucleus, by a float64 sort (ties at the threshold kept)."""
    x = logits.astype(np.float64)
    desc = np.sort(x)[::-1]
    probs = np.exp(desc - desc[0]) / np.exp(desc - desc[0]).sum()
    return x >= desc[(np.cumsum(probs) - probs) < top_p].min()


def filter_alone(rows: list[int], reps: int) -> list[dict[str, Any]]:
    """top_p 0.95 on peaked logits (the nucleus ends among the candidates, as a trained
    model's mostly does) and on flat ones (it does not: the fallback sorts)."""
    out = []
    fast = jax.jit(top_k_top_p.apply_top_k_top_p)
    full = jax.jit(lambda x, k, p: top_k_top_p.apply_top_k_top_p(x, k, p, candidates=VOCAB))
    for r in rows:
        for shape, boost in (("peaked", 16.0), ("flat", 0.0)):
            logits = np.random.default_rng(r).normal(0, 2, (r, VOCAB)).astype(np.float32)
            logits[:, :32] += boost
            args = (jnp.asarray(logits), jnp.zeros(r, jnp.int32), jnp.full(r, 0.95))
            row = {"rows": r, "logits": shape, "candidates_ms": best_ms(fast, *args, reps=reps)}
            row["full_sort_ms"] = best_ms(full, *args, reps=reps)
            row["speedup"] = row["full_sort_ms"] / row["candidates_ms"]
            # the kept sets against a float64 sort: flat rows spread 0.95 over ~18000 tokens,
            # and the f32 cumsum of the sort drifts by a token where the bisection's sums don't
            for name, fn in (("candidates", fast), ("full_sort", full)):
                got = np.isfinite(np.asarray(fn(*args)))
                row[f"{name}_rows_exact"] = sum(
                    np.array_equal(got[i], float64_kept(logits[i], 0.95)) for i in range(r)
                )
            out.append(row)
            progress(f"filter alone: {row}")
    return out


def engine_runs(args: argparse.Namespace) -> dict[str, Any]:
    engine = dict(
        max_model_len=args.prompt_len + args.output_len,
        max_num_seqs=args.num_requests,
        max_num_batched_tokens=512,
        show_progress=False,
    )
    with always_sorted():
        sorted_llm = LLM(**engine)
    tok_s: dict[str, dict[str, list[float]]] = {"candidates": {}, "full_sort": {}}
    with LLM(**engine) as fast, sorted_llm:
        for rep in range(args.reps):
            prompts = random_prompts(args.num_requests, args.prompt_len, VOCAB, seed=rep)
            prompts = [{"prompt_token_ids": p} for p in prompts]
            order = [("candidates", fast), ("full_sort", sorted_llm)]
            for name, llm in order if rep % 2 == 0 else order[::-1]:
                for label, extra in FILTERS.items():
                    params = SamplingParams(
                        temperature=1.0, seed=7, max_tokens=args.output_len, ignore_eos=True
                    )
                    llm.generate(prompts, params.with_updates(**extra), use_tqdm=False)
                    tok_s[name].setdefault(label, []).append(llm.last_run.output_tokens_per_s)
    record: dict[str, Any] = {}
    for name, runs in tok_s.items():
        best = {label: max(v) for label, v in runs.items()}
        record[name] = {
            label: {"tok_s": v, "vs_plain": v / best["plain"]} for label, v in best.items()
        }
    progress(f"engine runs (tok/s, each rep): {tok_s}")
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--filter-reps", type=int, default=5)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2, help="engine runs per filter: best of")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    record: dict[str, Any] = {
        "bench": "sampler",
        "args": vars(args),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "candidates": top_k_top_p.TOP_CANDIDATES,
        "filter_alone": filter_alone(args.rows, args.filter_reps),
        "engine": engine_runs(args),
    }
    print(f"{'':<32} {'candidates':>12} {'full sort':>12} {'speedup':>8}  rows exact (f64)")
    for row in record["filter_alone"]:
        print(
            f"{'filter alone, ' + str(row['rows']) + ' ' + row['logits'] + ' (ms)':<32} "
            f"{row['candidates_ms']:>12.1f} {row['full_sort_ms']:>12.1f} {row['speedup']:>7.1f}x  "
            f"{row['candidates_rows_exact']} / {row['full_sort_rows_exact']} of {row['rows']}"
        )
    for label in FILTERS:
        c, s = record["engine"]["candidates"][label], record["engine"]["full_sort"][label]
        print(
            f"{label + ' (tok/s, x plain)':<32} {c['tok_s']:>6.1f} {c['vs_plain']:>4.2f}x "
            f"{s['tok_s']:>6.1f} {s['vs_plain']:>4.2f}x"
        )
    save_record(record, args.out, "sampler")


if __name__ == "__main__":
    main()
