"""How many KV blocks an engine allocates: the bytes of one block, and the budget for all.

On accelerators the budget is the devices' free memory after the weights (and the LoRA slots)
are resident; on CPU it is what max_num_seqs full-length requests need, capped.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxserve.config import CacheConfig, SchedulerConfig
from jaxserve.model.spec import ModelSpec

# On CPU, with no kv_cache_memory given, the cache holds max_num_seqs full-length requests
# but never more than this many bytes.
_DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


def kv_block_bytes(spec: ModelSpec, block_size: int, dtype: jnp.dtype) -> int:
    """Bytes of one KV block over all layers (K and V)."""
    itemsize = jnp.dtype(dtype).itemsize
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * itemsize


def determine_num_blocks(
    spec: ModelSpec,
    cache_config: CacheConfig,
    scheduler_config: SchedulerConfig,
    dtype: jnp.dtype,
    params_bytes: int,
    devices: Sequence[jax.Device] | None = None,
) -> int:
    """How many KV blocks to allocate (block 0, the null block, included).

    `spec` is the execution spec (kv heads as the cache stores them); `devices` the engine's
    devices: on accelerators each contributes its free memory (the cache splits evenly).
    """
    if cache_config.num_gpu_blocks_override is not None:
        return cache_config.num_gpu_blocks_override
    per_block = kv_block_bytes(spec, cache_config.block_size, dtype)
    if cache_config.kv_cache_memory is not None:
        budget = cache_config.kv_cache_memory
    elif jax.default_backend() != "cpu":
        devices = list(devices) if devices is not None else jax.devices()[:1]
        # multi-host: only this process's devices can be asked (all are alike)
        local = [d for d in devices if d.process_index == jax.process_index()]
        stats = local[0].memory_stats() or {}
        limit = stats.get("bytes_limit", 0)
        # The weights are already resident (bytes_in_use); keep 10% of the rest for activations.
        in_use = stats.get("bytes_in_use", params_bytes // len(devices))
        per_device = int((limit * cache_config.gpu_memory_utilization - in_use) * 0.9)
        budget = per_device * len(devices)
    else:
        blocks_per_seq = -(-scheduler_config.max_model_len // cache_config.block_size)
        wanted = scheduler_config.max_num_seqs * blocks_per_seq + 1
        budget = min(wanted * per_block, _DEFAULT_CPU_KV_CACHE_BYTES)
    num_blocks = budget // per_block
    min_blocks = -(-scheduler_config.max_model_len // cache_config.block_size) + 1
    if num_blocks < min_blocks:
        raise ValueError(
            f"the KV cache budget ({budget} bytes, {num_blocks} blocks of {per_block} bytes) "
            f"cannot hold one max_model_len={scheduler_config.max_model_len} request "
            f"({min_blocks} blocks); raise kv_cache_memory / gpu_memory_utilization or lower "
            "max_model_len"
        )
    return int(num_blocks)
