"""The engine with attention_backend "pallas" vs "xla" on one random-weight model: greedy tokens,
their logprobs, and tok/s of each (a stage of scripts/device_check.py).

Both engines get the same token-id prompts and the same weights (load_format="dummy" draws them
from a fixed seed, on the device). Each generates twice: the first run compiles the step's
shapes, the second is timed (prefix caching off, so it redoes the same work) and must repeat
the first's tokens. Agreement is reported, not asserted: bf16 or TF32 rounding differs between
the kernels, and a random model's near-tied logits turn that into different argmaxes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

BACKENDS = ("xla", "pallas")
# top logprobs returned per generated token (what the logit comparison reads)
NUM_LOGPROBS = 5


@dataclass(frozen=True)
class Workload:
    num_prompts: int  # requests, all submitted at once
    prompt_len: int  # random token ids each
    max_tokens: int  # greedy output tokens each (ignore_eos)
    max_num_seqs: int  # engine: most requests in one step
    max_num_batched_tokens: int  # engine: token budget of one step
    kv_cache_memory: int | None = None  # engine: KV bytes (None: the engine's default sizing)


def _prompts(w: Workload, vocab_size: int, seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    return [
        {"prompt_token_ids": [rng.randrange(vocab_size) for _ in range(w.prompt_len)]}
        for _ in range(w.num_prompts)
    ]


def run_backend(model: str, dtype: str, backend: str, w: Workload) -> dict[str, Any]:
    """One engine on `backend`: start-up, a compiling run, a timed run; tokens and logprobs."""
    from jaxserve import LLM, SamplingParams
    from jaxserve.model.dummy import dummy_spec

    params = SamplingParams(
        temperature=0.0, max_tokens=w.max_tokens, ignore_eos=True, logprobs=NUM_LOGPROBS
    )
    engine: dict[str, Any] = dict(
        load_format="dummy",
        dtype=dtype,
        attention_backend=backend,
        max_model_len=w.prompt_len + w.max_tokens,
        max_num_seqs=w.max_num_seqs,
        max_num_batched_tokens=w.max_num_batched_tokens,
        enable_prefix_caching=False,  # the timed run recomputes everything, like the first
        enable_warmup=False,  # compile only the shapes the runs use (the first run pays)
        show_progress=False,
    )
    if w.kv_cache_memory is not None:
        engine["kv_cache_memory"] = w.kv_cache_memory
    prompts = _prompts(w, dummy_spec(model).vocab_size)
    t0 = time.perf_counter()
    with LLM(model, **engine) as llm:
        startup = time.perf_counter() - t0
        description = repr(llm)  # names the backend the engine runs
        t1 = time.perf_counter()
        first = llm.generate(prompts, params, use_tqdm=False)
        first_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t2
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [
        [{tid: lp.logprob for tid, lp in pos.items()} for pos in o.outputs[0].logprobs or []]
        for o in outs
    ]
    n_out = sum(len(t) for t in tokens)
    return {
        "engine": description,
        "startup_s": startup,
        "first_run_s": first_s,  # compiles included
        "seconds": seconds,
        "output_tokens": n_out,
        "output_tok_s": n_out / seconds,
        "repeats_first_run": tokens == [list(o.outputs[0].token_ids) for o in first],
        "tokens": tokens,
        "logprobs": logprobs,
    }


def agreement(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """How far two backends' greedy runs agree: whole requests, positions up to each request's
    first difference, and the logprob gap of every token both rank at those positions."""
    same_requests = sum(x == y for x, y in zip(a["tokens"], b["tokens"], strict=True))
    prefix = total = 0
    max_gap = 0.0
    for ta, tb, la, lb in zip(a["tokens"], b["tokens"], a["logprobs"], b["logprobs"], strict=True):
        n = next((i for i, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y), len(ta))
        prefix += n
        total += len(ta)
        # positions up to and including the first difference share their context
        for pa, pb in zip(la[: n + 1], lb[: n + 1], strict=False):
            for tid in set(pa) & set(pb):
                max_gap = max(max_gap, abs(pa[tid] - pb[tid]))
    return {
        "same_requests": f"{same_requests}/{len(a['tokens'])}",
        "tokens_equal": same_requests == len(a["tokens"]),
        "position_agreement": prefix / total if total else 1.0,
        "max_abs_logprob_diff": max_gap,
    }


def compare_backends(
    model: str, dtype: str, w: Workload, report: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Runs `model` on every backend in turn (each engine closed before the next starts)."""
    result: dict[str, Any] = {"model": model, "dtype": dtype, "workload": asdict(w)}
    runs = {}
    for backend in BACKENDS:
        runs[backend] = run_backend(model, dtype, backend, w)
        result[backend] = {k: v for k, v in runs[backend].items() if k not in ("logprobs",)}
        if report is not None:  # a partial result survives a later timeout
            report(result)
    result["agreement"] = agreement(runs["xla"], runs["pallas"])
    result["pallas_over_xla_tok_s"] = runs["pallas"]["output_tok_s"] / runs["xla"]["output_tok_s"]
    return result
