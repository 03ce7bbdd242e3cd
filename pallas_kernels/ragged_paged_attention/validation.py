"""Input checks both kernels share: shapes, dtypes and scalar arguments, on static facts only.

A leaf module (jax only): api.py and the per-platform kernels import it, never each other.
Every error names the argument and prints the offending value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Input dtypes per kernel; the CUDA kernel's tensor cores also take float16.
DTYPES = {
    "tpu": (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)),
    "cuda": (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)),
}


def validate(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    platform: str,
) -> None:
    """Raises ValueError naming the field and its value for any input `platform`'s kernel
    cannot take."""
    if q.ndim != 3:
        raise ValueError(f"q must be [T, num_q_heads, head_dim], got shape {q.shape}")
    if k_cache.ndim != 4:
        raise ValueError(
            f"k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got shape {k_cache.shape}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {v_cache.shape} != k_cache shape {k_cache.shape}")
    t, hq, d = q.shape
    _, bs, hkv, dk = k_cache.shape
    if dk != d:
        raise ValueError(f"head_dim of q ({d}) != head_dim of the KV cache ({dk})")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"num_q_heads={hq} must be a positive multiple of num_kv_heads={hkv} (GQA)"
        )
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if jnp.dtype(x.dtype) not in DTYPES[platform]:
            names = ", ".join(d.name for d in DTYPES[platform])
            raise ValueError(f"{name}.dtype must be one of {names} on {platform}, got {x.dtype}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(
            f"q, k_cache, v_cache dtypes must match, got {q.dtype}, {k_cache.dtype}, "
            f"{v_cache.dtype}"
        )
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables must be [R, B], got shape {block_tables.shape}")
    r = block_tables.shape[0]
    for name, x, shape in (
        ("kv_lens", kv_lens, (r,)),
        ("block_tables", block_tables, block_tables.shape),
        ("cu_q_lens", cu_q_lens, (r + 1,)),
        ("num_seqs", num_seqs, (1,)),
    ):
        if x.shape != shape:
            raise ValueError(f"{name} must have shape {shape} (R={r}), got {x.shape}")
        if x.dtype != jnp.int32:
            raise ValueError(f"{name}.dtype must be int32, got {x.dtype}")
    if not sm_scale > 0:
        raise ValueError(f"sm_scale must be > 0, got {sm_scale!r}")
    if sliding_window is not None and (int(sliding_window) != sliding_window or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be > 0 or None, got {soft_cap!r}")
    del t
