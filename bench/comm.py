"""COMM: per-step collectives (count and bytes, all-reduces per layer) of a TP step, read from
the compiled HLO, for a Llama-3-shaped model compiled from shapes alone (nothing allocated).
The host device count must already cover the TP size (bench/throughput.py sets XLA_FLAGS)."""

from __future__ import annotations

from typing import Any

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


def run_comm_own(engine: dict[str, Any], decode_reqs: int, prefill_tokens: int) -> dict[str, Any]:
    """The same report for the benchmarked model at the engine's own TP size."""
    from jaxserve import LLM
    from jaxserve.runner.hlo_stats import collective_stats

    with LLM(**{**engine, "enable_warmup": False}) as llm:
        runner = llm.engine.core.runner
        own: dict[str, Any] = {"model": "default", "tp": engine["tensor_parallel_size"]}
        for phase, shape in (
            ("decode", runner.buckets.select(decode_reqs, 1)),
            ("prefill", runner.buckets.select(prefill_tokens, 1)),
        ):
            stats = collective_stats(runner.compiled_step_text(shape), runner.spec.num_layers)
            own[phase] = {"bucket_T_R_B": shape, **stats.to_dict()}
    return own
