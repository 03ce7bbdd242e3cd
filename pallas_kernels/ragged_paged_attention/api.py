"""The public ragged paged attention entry: validates inputs, then picks the platform's kernel.

Every check runs on static shapes and dtypes, so it works the same under jit and prints the
offending values. Backend modules are imported lazily: the CUDA kernel (gpu.py) is only loaded
when a CUDA kernel is asked for.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.validation import DTYPES, validate

PLATFORMS = ("tpu", "cuda")


def kernel_platform(backend: str) -> str:
    """The kernel a jax backend runs: CUDA's on GPUs, else TPU's (interpreted off a TPU)."""
    return "cuda" if backend in ("gpu", "cuda") else "tpu"


def config_error(
    platform: str, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype
) -> str | None:
    """Why `platform`'s kernel cannot serve a model/cache configuration, or None if it can.

    Static facts only (the engine asks once at start, to choose its attention backend).
    """
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        return (
            f"num_q_heads={num_q_heads} must be a positive multiple of num_kv_heads={num_kv_heads}"
        )
    dtype = jnp.dtype(dtype)
    if dtype not in DTYPES[platform]:
        names = ", ".join(d.name for d in DTYPES[platform])
        return f"dtype must be one of {names} on {platform}, got {dtype}"
    if platform == "cuda":
        from pallas_kernels.ragged_paged_attention import gpu  # lazy: CUDA-only dependencies

        return gpu.config_error(num_q_heads, num_kv_heads, head_dim, block_size, dtype)
    from pallas_kernels.ragged_paged_attention.tpu import sublane_multiple

    if block_size % (sub := sublane_multiple(dtype)):
        return (
            f"block_size={block_size} must be a multiple of {sub} for {dtype} on TPU "
            "(each page lands in VMEM as whole (sublane x lane) tiles)"
        )
    return None


def resolve_platform(platform: str | None, interpret: Any) -> str:
    """`platform`, or the kernel that fits the default device (TPU's interpreter on CPU)."""
    if platform is not None:
        if platform not in PLATFORMS:
            raise ValueError(f"platform must be one of {PLATFORMS} or None, got {platform!r}")
        return platform
    backend = jax.default_backend()
    if backend in ("tpu", "gpu", "cuda"):
        return kernel_platform(backend)
    if interpret:
        # The TPU interpreter models DMAs and semaphores on CPU, so it is the CPU stand-in.
        return "tpu"
    raise ValueError(
        f"no Pallas ragged paged attention kernel runs natively on {backend!r}; pass "
        "interpret=True (and optionally platform='tpu' or 'cuda') to interpret one"
    )


def validate_tpu(
    q: jax.Array, k_cache: jax.Array, block_tables: jax.Array, knobs: dict[str, Any]
) -> None:
    """Mosaic TPU tiling rules: tiles' second-minor dims are multiples of 8 (32-bit) / 16."""
    from pallas_kernels.ragged_paged_attention.tpu import sublane_multiple

    unknown = set(knobs) - {"q_block", "kv_pages_per_chunk", "vmem_limit_bytes"}
    if unknown:
        raise ValueError(f"unknown TPU kernel knobs {sorted(unknown)}")
    _, bs, hkv, d = k_cache.shape
    if error := config_error("tpu", q.shape[1], hkv, d, bs, k_cache.dtype):
        raise ValueError(error)
    qb = knobs.get("q_block")
    if qb is not None and (qb <= 0 or qb % sublane_multiple(q.dtype)):
        raise ValueError(
            f"q_block={qb} must be a positive multiple of {sublane_multiple(q.dtype)} for {q.dtype}"
        )
    ppc = knobs.get("kv_pages_per_chunk")
    if ppc is not None and ppc <= 0:
        raise ValueError(f"kv_pages_per_chunk must be positive, got {ppc}")
    vmem = knobs.get("vmem_limit_bytes")
    if vmem is not None and vmem <= 0:
        raise ValueError(f"vmem_limit_bytes must be positive, got {vmem}")


def ragged_paged_attention(
    q: jax.Array,  # [T, num_q_heads, head_dim]
    k_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    kv_lens: jax.Array,  # i32[R] tokens with KV after this step
    block_tables: jax.Array,  # i32[R, B]
    cu_q_lens: jax.Array,  # i32[R + 1]; rows past the real requests repeat the total
    num_seqs: jax.Array,  # i32[1] real requests
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    platform: str | None = None,  # "tpu" | "cuda" | None (the default device's)
    interpret: Any = False,  # True: run the kernel in Pallas interpret mode (CPU)
    **knobs: Any,  # static tuning knobs of the platform's kernel
) -> jax.Array:  # [T, num_q_heads, head_dim]; rows of padding tokens are 0
    """Causal ragged paged attention over a flat batch of decode tokens and prefill chunks."""
    validate(
        q,
        k_cache,
        v_cache,
        kv_lens,
        block_tables,
        cu_q_lens,
        num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        # The kernel interpret=True would pick: input errors come before "no kernel on cpu".
        platform=resolve_platform(platform, interpret=True),
    )
    platform = resolve_platform(platform, interpret)
    args = (q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, num_seqs)
    kwargs = dict(sm_scale=float(sm_scale), sliding_window=sliding_window, soft_cap=soft_cap)
    if platform == "tpu":
        validate_tpu(q, k_cache, block_tables, knobs)
        from pallas_kernels.ragged_paged_attention import tpu

        return tpu.ragged_paged_attention_tpu(*args, **kwargs, interpret=interpret, **knobs)
    from pallas_kernels.ragged_paged_attention import gpu  # lazy: CUDA-only dependencies

    return gpu.ragged_paged_attention_gpu(*args, **kwargs, interpret=interpret, **knobs)
