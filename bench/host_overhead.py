"""HOST: the engine's host cost per request per step, on a null model whose device step is
nearly free (1 layer, width 64, random weights), at many concurrent decodes.

host us per request per step = (wall time per decode step in the engine loop - the jitted
step's device time on the same inputs) / running requests, from decode_breakdown.StepProbe.
With async scheduling (an `async_scheduling` engine argument, when EngineArgs has one) the
row runs on and off; without it, only off.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from decode_breakdown import StepProbe
from workloads import random_prompts, run_jaxserve

# Null model: one layer of width 64 (4 heads x 16, 2 kv heads) and a small vocabulary, so the
# device step (lm_head and sampler included) stays small next to the host work per request.
NULL_HIDDEN, NULL_HEADS, NULL_KV_HEADS, NULL_FFN, NULL_VOCAB = 64, 4, 2, 128, 4096


def write_null_model(path: Path) -> Path:
    """A random 1-layer Llama HF dir (config.json + safetensors) with SmolLM2's tokenizer
    (its ids past NULL_VOCAB are never produced or sent)."""
    from safetensors.numpy import save_file

    from jaxserve.model.loader import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    rng = np.random.default_rng(0)
    hd = NULL_HIDDEN // NULL_HEADS

    def w(*shape: int) -> np.ndarray:  # HF layout [out, in]
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)

    p = "model.layers.0."
    tensors = {
        "model.embed_tokens.weight": w(NULL_VOCAB, NULL_HIDDEN),
        "model.norm.weight": np.ones(NULL_HIDDEN, np.float32),
        p + "input_layernorm.weight": np.ones(NULL_HIDDEN, np.float32),
        p + "post_attention_layernorm.weight": np.ones(NULL_HIDDEN, np.float32),
        p + "self_attn.q_proj.weight": w(NULL_HEADS * hd, NULL_HIDDEN),
        p + "self_attn.k_proj.weight": w(NULL_KV_HEADS * hd, NULL_HIDDEN),
        p + "self_attn.v_proj.weight": w(NULL_KV_HEADS * hd, NULL_HIDDEN),
        p + "self_attn.o_proj.weight": w(NULL_HIDDEN, NULL_HEADS * hd),
        p + "mlp.gate_proj.weight": w(NULL_FFN, NULL_HIDDEN),
        p + "mlp.up_proj.weight": w(NULL_FFN, NULL_HIDDEN),
        p + "mlp.down_proj.weight": w(NULL_HIDDEN, NULL_FFN),
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    config = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=NULL_VOCAB,
        hidden_size=NULL_HIDDEN,
        intermediate_size=NULL_FFN,
        num_hidden_layers=1,
        num_attention_heads=NULL_HEADS,
        num_key_value_heads=NULL_KV_HEADS,
        head_dim=hd,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    (path / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(str(path))
    return path


def async_modes() -> list[bool | None]:
    """The async_scheduling values to run: on and off where the engine has the flag, else
    [None] (the engine's one, synchronous, loop)."""
    from jaxserve.config import EngineArgs

    names = {f.name for f in dataclasses.fields(EngineArgs)}
    return [False, True] if "async_scheduling" in names else [None]


def run_host_overhead(
    num_requests: int, prompt_len: int, output_len: int, reps: int, engine: dict[str, Any]
) -> dict[str, Any]:
    """The HOST row: `num_requests` concurrent decodes on the null model, per async mode."""
    out: dict[str, Any] = {"num_requests": num_requests, "prompt_len": prompt_len}
    prompts = random_prompts(num_requests, prompt_len, NULL_VOCAB, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = {
            **engine,
            "model": str(write_null_model(Path(tmp) / "null")),
            "max_num_seqs": num_requests,
            # room for a prefill chunk beside a full batch of decodes: every request is
            # admitted long before the first one finishes, so the decode phase is full
            "max_num_batched_tokens": max(engine["max_num_batched_tokens"], 2 * num_requests),
            "max_model_len": prompt_len + output_len,
        }
        for mode in async_modes():
            if mode is not None:
                kwargs["async_scheduling"] = mode
            probe = StepProbe(num_requests, reps=reps)
            run = run_jaxserve(prompts, output_len, kwargs, probe=probe)
            label = "off" if not mode else "on"
            out[f"async_{label}"] = {
                "output_tok_s": run["output_tok_s"],
                "breakdown": run["probe"],
                "host_us_per_request_step": run["probe"]["host_us_per_request_step"],
            }
    out["async_scheduling"] = "on and off" if "async_on" in out else "off (no such engine flag)"
    return out


def host_rows(h: dict[str, Any]) -> list[tuple[str, float, str]]:
    rows = []
    for label in ("off", "on"):
        if f"async_{label}" not in h:
            continue
        r = h[f"async_{label}"]
        b = r["breakdown"]
        rows.append(
            (
                f"HOST null model, async {label}",
                r["output_tok_s"],
                f"{r['host_us_per_request_step']:.1f} us/request/step at {b['requests']} reqs"
                f" (wall {b['wall_step_s'] * 1e3:.1f} - device"
                f" {b['device_step']['median_s'] * 1e3:.1f} ms; target <= 10)",
            )
        )
    return rows
