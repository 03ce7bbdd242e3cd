"""The repr of an open LLM: what a notebook user sees when they evaluate `llm`."""

from __future__ import annotations

from typing import Any

import jax


def id_(device: jax.Device) -> int:
    return device.id


def describe(llm: Any) -> str:
    """The repr of an open LLM: model, dtype, devices, KV cache, buckets, backend."""
    assert llm.engine is not None
    core = llm.engine.core
    runner = core.runner
    args = llm.args
    num_params = sum(x.size for x in jax.tree.leaves(runner.params))
    devices = " | ".join(
        ", ".join(f"{d.platform}:{d.id}" for d in sorted(r.runner.kv_cache.k.devices(), key=id_))
        for r in core.replicas
    )
    buckets = runner.buckets
    num_programs = len(buckets.token_sizes) * len(buckets.block_sizes)
    return (
        f"LLM(model={args.model!r}, dtype={core.dtype.name}, params={num_params / 1e6:.1f}M, "
        f"devices=[{devices}],\n"
        f"    tensor_parallel_size={args.tensor_parallel_size}, "
        f"data_parallel_size={args.data_parallel_size} (KV cache below is per replica),\n"
        f"    max_model_len={core.max_model_len}, max_num_seqs={args.max_num_seqs}, "
        f"max_num_batched_tokens={args.max_num_batched_tokens},\n"
        f"    kv_cache={runner.num_blocks - 1} blocks x {runner.block_size} tokens "
        f"({runner.kv_cache_bytes / 2**20:.1f} MiB), "
        f"prefix_caching={args.enable_prefix_caching},\n"
        f"    buckets=tokens {buckets.token_sizes} x block-table widths {buckets.block_sizes} "
        f"({num_programs} programs), attention_backend={runner.attention_backend!r})"
    )
