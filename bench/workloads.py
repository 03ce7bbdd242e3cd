"""The workloads bench/throughput.py runs: jaxserve offline (optionally with attention a
no-op, or with a probe attached to its runner), workload C's interleaved cost, a long prompt's
prefill alone, and transformers generate() as the outside baseline.

Every run function returns a JSON-ready dict (token ids kept under "token_ids", which the
record leaves out).
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Iterator
from typing import Any, Protocol

from jaxserve import LLM, SamplingParams

# SmolLM2's vocabulary (the default model's).
VOCAB = 49152


def progress(message: str) -> None:
    """One line per finished run on stderr, so a long bench shows where it is."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Stay clear of the special tokens at the bottom of the vocabulary.
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


@contextlib.contextmanager
def attention_disabled() -> Iterator[None]:
    """Attention a no-op (its output is its query) for every step traced inside: what the rest
    of the step (weights, MLP, lm_head, sampler, KV writes) costs. The tokens are garbage.

    make_attention binds layers.paged_attention when a step function is made (the engine does
    that at start-up), so engines and step functions made inside keep the no-op for life."""
    import jaxserve.model.layers as layers

    real = layers.paged_attention
    layers.paged_attention = lambda q, *args, **kwargs: q
    try:
        yield
    finally:
        layers.paged_attention = real


class Probe(Protocol):
    """Looks at one engine's runner during a run (decode_breakdown.StepProbe)."""

    def attach(self, runner: Any) -> None: ...  # before generate()

    def measure(self, runner: Any) -> dict[str, Any]: ...  # after generate(), engine alive


def runner_of(llm: LLM) -> Any:
    """The model runner of an in-process, single-replica engine (what probes need)."""
    core = getattr(llm.engine, "core", None)
    runner = getattr(core, "runner", None)
    if runner is None:
        raise RuntimeError("no in-process model runner (data parallel?): nothing to probe")
    return runner


def run_jaxserve(
    prompts: list[list[int]],
    max_tokens: int,
    engine_kwargs: dict[str, Any],
    *,
    no_attention: bool = False,
    probe: Probe | None = None,
) -> dict[str, Any]:
    """One generate() of `prompts` on a fresh engine (start-up and warmup not timed)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    with attention_disabled() if no_attention else contextlib.nullcontext():
        llm = LLM(**engine_kwargs)
    with llm:
        startup = time.perf_counter() - t0
        if probe is not None:
            probe.attach(runner_of(llm))
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        stats = llm.stats
        probed = probe.measure(runner_of(llm)) if probe is not None else None
    ttfts = sorted(o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outs)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    progress(
        f"{len(prompts)} requests{' (no attention)' if no_attention else ''}"
        f" {engine_kwargs.get('dtype', '')}: {n_out / elapsed:.1f} tok/s in {elapsed:.1f} s"
        f" (start-up {startup:.1f} s)"
    )
    out = {
        "seconds": elapsed,
        "startup_seconds": startup,
        "output_tokens": n_out,
        "output_tok_s": n_out / elapsed,
        "ttft_p50_s": ttfts[len(ttfts) // 2],
        "stats": stats,
        "token_ids": [o.outputs[0].token_ids for o in outs],
    }
    if probed is not None:
        out["probe"] = probed
    return out


def run_attention_ceiling(
    prompts: list[list[int]], max_tokens: int, engine_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The CEIL row: the workload with attention a no-op, the ceiling any attention
    implementation leaves room under on this machine."""
    return run_jaxserve(prompts, max_tokens, engine_kwargs, no_attention=True)


def run_prefill_pair(prompt_len: int, reps: int, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A `prompt_len`-token prompt alone, max_tokens=1, on the engine and on the same engine
    with attention a no-op: prefill tok/s from the time to first token, best of `reps`.

    Both engines stay alive and the reps alternate which goes first, each on a fresh random
    prompt (nothing hits the prefix cache), so a drift of this noisy machine lands on both:
    measured one after the other, the no-attention best moved 1.56-2.21 s between runs of
    unchanged code."""
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    kwargs = {**engine_kwargs, "max_model_len": prompt_len + 1}
    with attention_disabled():
        free = LLM(**kwargs)
    ttfts: dict[str, list[float]] = {"real": [], "no_attention": []}
    with LLM(**kwargs) as real, free:
        for rep in range(reps):
            (prompt,) = random_prompts(1, prompt_len, VOCAB, seed=1000 + rep)
            order = [("real", real), ("no_attention", free)]
            for name, llm in order if rep % 2 == 0 else order[::-1]:
                (out,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
                ttfts[name].append(out.metrics["first_token_time"] - out.metrics["arrival_time"])
    progress(f"{prompt_len}-token prefill, real and no attention: {ttfts}")
    return {
        name: {"prompt_len": prompt_len, "ttft_s": t, "prefill_tok_s": prompt_len / min(t)}
        for name, t in ttfts.items()
    }


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
                for p in random_prompts(num_requests, prompt_len, VOCAB, seed=100 + rep)
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


def without_token_ids(run: dict[str, Any]) -> dict[str, Any]:
    """A run's dict as the JSON record keeps it."""
    return {k: v for k, v in run.items() if k != "token_ids"}
