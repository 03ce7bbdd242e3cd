"""Runs the tensor-parallel checks on 8 virtual CPU devices and writes their results as JSON.

XLA_FLAGS must be set before jax initialises, and the pytest process has jax running already,
so the tests start this script once (one start-up for every check) and assert on its JSON.
A check that raises records its traceback instead of a result, so the others still report.

usage: tp_worker.py OUT.json TMP_DIR GROUP [GROUP ...]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import functools  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from tests.model.tiny_hf import write_tiny_hf  # noqa: E402
from tests.parallel.configs import ENGINE, TINY_PROMPTS  # noqa: E402

TEXT_PROMPTS = ["The capital of France is", "def fibonacci(n):"]

# Tiny random models: 8 query heads of 16 dims. kv8: every TP in {2, 4, 8} shards kv heads;
# kv2: TP 4 and 8 replicate them (and it has qkv biases and an untied lm_head, so bk/bv
# repetition and a separate vocab-parallel lm_head are exercised too).
TINY = {
    "kv8": dict(arch="LlamaForCausalLM", kv_heads=8, tie=True),
    "kv2": dict(arch="Qwen2ForCausalLM", kv_heads=2, tie=False),
}


def run_llm(model: str, tp: int, prompts: list) -> dict:
    """Greedy and seeded-sampled tokens, plus where the KV cache and weights live."""
    from jaxserve import LLM, SamplingParams
    from jaxserve.runner.embedder import Embedder
    from jaxserve.structured_output.params import StructuredOutputsParams

    tokens_prompts = isinstance(prompts[0], dict)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    # the token bitmask, logit_bias and prompt logprobs under the mesh too
    constrained = SamplingParams(
        max_tokens=12,
        temperature=1.0,
        seed=3,
        logit_bias={300: 5.0},
        prompt_logprobs=3,
        structured_outputs=StructuredOutputsParams(regex="[a-z]{2,5}-[0-9]{2}"),
    )
    with LLM(model, tensor_parallel_size=tp, **ENGINE) as llm:
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        sampled = llm.generate(prompts[:1], seeded, use_tqdm=False)
        con = llm.generate(prompts[:1], constrained, use_tqdm=False)[0]
        runner = llm.engine.core.runner
        per_device = runner.kv_cache_bytes_per_device
        # the server's /v1/embeddings path over the same (sharded, kv-repeated) params
        embedder = Embedder.for_runner(runner, llm.engine.core.max_model_len)
        embedding = embedder.embed(prompts[0]["prompt_token_ids"]) if tokens_prompts else None
        wq = runner.params.layers.wq
        return {
            "greedy": [o.outputs[0].token_ids for o in outs],
            "seeded": sampled[0].outputs[0].token_ids,
            "constrained": con.outputs[0].text,
            "prompt_logprobs": [
                None if p is None else {str(t): lp.logprob for t, lp in p.items()}
                for p in con.prompt_logprobs
            ],
            "kv_total_bytes": runner.kv_cache_bytes,
            "kv_bytes_per_device": sorted(per_device.values()),
            "kv_devices": len(per_device),
            "kv_shard_shape": list(runner.kv_cache.k.addressable_shards[0].data.shape),
            "kv_global_shape": list(runner.kv_cache.k.shape),
            "wq_shard_shape": list(wq.addressable_shards[0].data.shape),
            "wq_global_shape": list(wq.shape),
            "num_blocks": runner.num_blocks,
            "compiles_after_warmup": runner.num_compiles_after_warmup,
            "embedding": embedding,
        }


def group_smollm2(tmp: Path) -> dict:
    out = {f"tp{tp}": run_llm("smollm2-135m", tp, TEXT_PROMPTS) for tp in (1, 3)}
    try:
        run_llm("smollm2-135m", 2, TEXT_PROMPTS)
        out["tp2_error"] = None
    except ValueError as e:
        out["tp2_error"] = str(e)
    return out


def group_tiny(tmp: Path) -> dict:
    out = {}
    for name, cfg in TINY.items():
        path = write_tiny_hf(tmp / name, **cfg)
        out[name] = {f"tp{tp}": run_llm(str(path), tp, TINY_PROMPTS) for tp in (1, 2, 4, 8)}
    return out


def group_lora(tmp: Path) -> dict:
    """Two adapters and the base model in one batch, at TP 1, 2 and 4 (kv2 at TP 4 repeats
    its kv heads, so the adapters' k/v columns are repeated like the weights)."""
    from jaxserve import LLM, SamplingParams
    from jaxserve.lora.request import LoRARequest
    from tests.lora.random_adapter import write_random_adapter

    out = {}
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for name, cfg in TINY.items():
        path = tmp / name
        if not path.exists():
            write_tiny_hf(path, **cfg)
        kv = cfg["kv_heads"] * 16
        loras = [
            LoRARequest(
                f"{name}-{i}",
                i + 1,
                str(
                    write_random_adapter(
                        tmp / f"{name}-lora{i}",
                        num_layers=2,
                        hidden_size=128,
                        intermediate_size=256,
                        q_size=128,
                        kv_size=kv,
                        rank=8,
                        seed=i,
                        std=0.15,
                    )
                ),
            )
            for i in range(2)
        ]
        prompts = [TINY_PROMPTS[0]] * 3 + [TINY_PROMPTS[1]] * 3
        mix = [None, *loras] * 2
        out[name] = {}
        for tp in (1, 2, 4):
            with LLM(
                str(path), tensor_parallel_size=tp, enable_lora=True, max_loras=2, **ENGINE
            ) as llm:
                outs = llm.generate(prompts, greedy, lora_request=mix, use_tqdm=False)
                slots = llm.engine.core.runner.lora_slots
                out[name][f"tp{tp}"] = {
                    "greedy": [o.outputs[0].token_ids for o in outs],
                    "b_q_shard_shape": list(slots.stacks.b["wq"].addressable_shards[0].data.shape),
                    "a_o_shard_shape": list(slots.stacks.a["wo"].addressable_shards[0].data.shape),
                    "b_k_global_shape": list(slots.stacks.b["wk"].shape),
                }
    return out


def group_orbax(tmp: Path) -> dict:
    """Sharded save -> restore into shardings (same and other TP, and unsharded): bit-exact."""
    import jax
    import jax.numpy as jnp

    from jaxserve.model import checkpoint, llama, sharding
    from tests.model.helpers import tiny_spec

    spec = tiny_spec(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_q_heads=8,
        num_kv_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        qkv_bias=True,
    )
    params = llama.init_params(spec, jax.random.key(0), jnp.float32)
    want = checkpoint._flat(params)
    mesh4 = sharding.make_mesh(4)
    placed = sharding.place_params(spec, params, mesh4)
    dst = tmp / "ckpt"
    shutil.rmtree(dst, ignore_errors=True)
    checkpoint.save_checkpoint(dst, placed, spec)
    result = {}
    for tp in (None, 4, 8):
        mesh = sharding.make_mesh(tp) if tp else None
        got_spec, got = checkpoint.load_checkpoint(dst, mesh=mesh)
        flat = checkpoint._flat(got)
        exact = all(
            np.array_equal(np.asarray(want[k]), np.asarray(flat[k]))
            and flat[k].dtype == want[k].dtype
            for k in want
        )
        placement_ok = True
        if mesh is not None:
            repeat = sharding.kv_repeat(spec, tp)
            for k, arr in flat.items():
                target = sharding.named(mesh, k, arr.shape)
                if repeat > 1 and k in ("wk", "wv", "bk", "bv"):
                    continue  # restored replicated, repeated at placement
                placement_ok &= arr.sharding.is_equivalent_to(target, arr.ndim)
        result[f"tp{tp}"] = {
            "exact": exact,
            "spec_same": got_spec == spec,
            "placement_ok": bool(placement_ok),
            "wq_shard_shape": list(flat["wq"].addressable_shards[0].data.shape),
        }
    return result


def group_shard_map(tmp: Path) -> dict:
    """The shard_map attention wrapper (xla backend inside) == the plain call, on 4 devices."""
    import jax
    import jax.numpy as jnp

    from jaxserve.model import layers, sharding
    from jaxserve.model.attention import AttentionMetadata

    out = {}
    for hq, hkv in ((8, 4), (8, 8), (16, 4)):
        mesh = sharding.make_mesh(4)
        k = jax.random.split(jax.random.key(hq + hkv), 3)
        t, nb, bs, d = 8, 8, 4, 16
        q = jax.random.normal(k[0], (t, hq, d), jnp.float32)
        kc = jax.random.normal(k[1], (nb, bs, hkv, d), jnp.float32)
        vc = jax.random.normal(k[2], (nb, bs, hkv, d), jnp.float32)
        # request 0: kv_len 10, its last 3 tokens in this step; request 1: kv_len 6, last 5
        positions = jnp.array([7, 8, 9, 1, 2, 3, 4, 5], jnp.int32)
        md = AttentionMetadata(
            slot_mapping=jnp.zeros((t,), jnp.int32),
            token_req_idx=jnp.array([0, 0, 0, 1, 1, 1, 1, 1], jnp.int32),
            block_tables=jnp.array([[1, 2, 3], [4, 5, 0]], jnp.int32),
            kv_lens=jnp.array([10, 6], jnp.int32),
            cu_q_lens=jnp.array([0, 3, 8], jnp.int32),
        )
        kw = dict(sm_scale=d**-0.5, sliding_window=None, backend="xla")
        wrapped = sharding.shard_map_attention(layers.paged_attention, mesh)
        args = (q, kc, vc, positions, md)
        plain = jax.jit(functools.partial(layers.paged_attention, **kw))(*args)
        sharded = jax.jit(functools.partial(wrapped, **kw))(*args)
        out[f"hq{hq}_hkv{hkv}"] = {
            "max_abs_diff": float(jnp.max(jnp.abs(plain - sharded))),
            "max_abs": float(jnp.max(jnp.abs(plain))),
        }
    return out


def group_hlo(tmp: Path) -> dict:
    """Collective stats of the TP=2 step of the tiny kv8 model."""
    from jaxserve import LLM
    from jaxserve.runner.hlo_stats import abstract_step_collectives, collective_stats

    path = write_tiny_hf(tmp / "kv8_hlo", **TINY["kv8"])
    with LLM(str(path), tensor_parallel_size=2, **ENGINE) as llm:
        runner = llm.engine.core.runner
        text = runner.compiled_step_text()
        stats = collective_stats(text, runner.spec.num_layers)
        # the bench's path: the same step compiled from shapes alone, TP=8 with kv heads
        # repeated (a 2-kv-head model), a decode bucket of 4 requests
        import dataclasses

        spec = dataclasses.replace(llm.engine.core.spec, num_kv_heads=2)
        abstract = abstract_step_collectives(spec, 8, shape=(4, 4, 4), dtype="float32")
        return {
            "stats": stats.to_dict(),
            "abstract_tp8": abstract.to_dict(),
            "num_layers": runner.spec.num_layers,
            "vocab": runner.spec.vocab_size,
            "hidden": runner.spec.hidden_size,
        }


GROUPS = {
    "smollm2": group_smollm2,
    "tiny": group_tiny,
    "orbax": group_orbax,
    "lora": group_lora,
    "shard_map": group_shard_map,
    "hlo": group_hlo,
}


def main() -> None:
    out_path, tmp = Path(sys.argv[1]), Path(sys.argv[2])
    import jax

    results: dict = {"num_devices": len(jax.devices())}
    for name in sys.argv[3:]:
        try:
            results[name] = GROUPS[name](tmp)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    out_path.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
