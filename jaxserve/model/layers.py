"""The building blocks of a decoder layer: RMSNorm, rotary embedding, SwiGLU, attention dispatch.

Numerics follow Hugging Face transformers (the parity oracle): norms reduce in float32, rope
uses the "rotate_half" layout (first half of head_dim pairs with the second half), and rope
frequencies are computed on the host in float32 exactly as HF computes `inv_freq`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.model.attention import AttentionMetadata, xla_paged_attention
from jaxserve.model.spec import ModelSpec, RopeScaling

ATTENTION_BACKENDS = ("xla", "pallas")
# One layer's attention over the paged cache, as the model calls it:
# (q [T, Hq, D], k_cache, v_cache [N, bs, Hkv, D], positions i32[T], md, *, sm_scale,
# sliding_window) -> [T, Hq, D]. The runner builds it (make_attention, then shard_map under TP).
AttentionFn = Callable[..., jax.Array]


def rms_norm(
    x: jax.Array,  # [..., D]
    weight: jax.Array,  # [D]
    eps: float,
) -> jax.Array:  # [..., D] in x.dtype
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope_inv_freq(spec: ModelSpec) -> np.ndarray:  # f32[head_dim // 2]
    """Rotary inverse frequencies with the spec's scaling applied (host-side constant)."""
    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    inv = inv.astype(np.float32)
    rs = spec.rope_scaling
    if rs is None:
        return inv
    if rs.rope_type == "linear":
        return (inv / rs.factor).astype(np.float32)
    if rs.rope_type == "llama3":
        return _llama3_inv_freq(inv, rs)
    if rs.rope_type == "freq_factors":
        assert rs.freq_factors is not None and len(rs.freq_factors) == d // 2
        return (inv / np.asarray(rs.freq_factors, np.float32)).astype(np.float32)
    raise ValueError(f"unknown rope_type {rs.rope_type!r}")


def _llama3_inv_freq(inv: np.ndarray, rs: RopeScaling) -> np.ndarray:
    # Llama 3.1: long wavelengths are stretched by `factor`, short ones kept, and the band in
    # between interpolated smoothly (transformers `_compute_llama3_parameters`).
    old = rs.original_max_position_embeddings
    low_wavelen = old / rs.low_freq_factor
    high_wavelen = old / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(
    positions: jax.Array,  # i32[T]
    inv_freq: np.ndarray,  # f32[head_dim // 2]
) -> tuple[jax.Array, jax.Array]:  # f32[T, head_dim] each
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(
    x: jax.Array,  # [T, H, head_dim]
    cos: jax.Array,  # f32[T, head_dim]
    sin: jax.Array,  # f32[T, head_dim]
) -> jax.Array:  # [T, H, head_dim]
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, None, :] + rotated * sin[:, None, :]
    return out.astype(x.dtype)


def linear(
    x: jax.Array,  # [..., in] any float dtype
    w: jax.Array,  # [in, out]
) -> jax.Array:  # f32[..., out]
    """x @ w in the weights' dtype, accumulated and returned in float32.

    NOTE: with bf16 weights, a plain `x @ w` (bf16 out) makes XLA:CPU convert the whole weight
    to f32 before every dot (the output dtype decides the dot's type), so each step read the
    weights as bf16, wrote them as f32 and read them again; a bf16 x bf16 dot returning f32
    runs natively (YNNPACK) and reads the bf16 weight once. With f32 weights this is `x @ w`.
    """
    return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def swiglu_mlp(
    x: jax.Array,  # [T, E]
    w_gate: jax.Array,  # [E, F]
    w_up: jax.Array,  # [E, F]
    w_down: jax.Array,  # [F, E]
) -> jax.Array:  # f32[T, E]
    with jax.named_scope("mlp"):
        return linear(jax.nn.silu(linear(x, w_gate)) * linear(x, w_up), w_down)


def make_attention(backend: str, *, interpret: bool = False) -> AttentionFn:
    """The attention for `backend`; `interpret`: run the Pallas kernel interpreted (on CPU)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    return functools.partial(paged_attention, backend=backend, interpret=interpret)


def paged_attention(
    q: jax.Array,  # [T, num_q_heads, head_dim]
    k_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim] one layer
    v_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    positions: jax.Array,  # i32[T]
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None,
    backend: str,
    interpret: bool = False,
) -> jax.Array:  # [T, num_q_heads, head_dim]
    """Picks the attention implementation; the cache already holds this step's K/V."""
    if backend == "xla":
        return xla_paged_attention(
            q, k_cache, v_cache, positions, md, sm_scale=sm_scale, sliding_window=sliding_window
        )
    if backend == "pallas":
        return pallas_paged_attention(
            q,
            k_cache,
            v_cache,
            md,
            sm_scale=sm_scale,
            sliding_window=sliding_window,
            interpret=interpret,
        )
    raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")


def pallas_paged_attention(
    q: jax.Array,  # [T, num_q_heads, head_dim]
    k_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None,
    interpret: bool = False,
) -> jax.Array:  # [T, num_q_heads, head_dim]
    """The platform's Pallas kernel; `interpret` (CPU): the TPU kernel interpreted (tests)."""
    # Imported here: pallas_kernels pulls in Pallas/Mosaic, which the xla path never needs.
    from pallas_kernels.ragged_paged_attention import ragged_paged_attention

    # Every row counts as a request: the runner's padding rows have q_len 0 and kv_len 0,
    # which the kernel skips, so no separate count of real requests is needed.
    num_seqs = jnp.full((1,), md.kv_lens.shape[0], jnp.int32)
    return ragged_paged_attention(
        q,
        k_cache,
        v_cache,
        md.kv_lens,
        md.block_tables,
        md.cu_q_lens,
        num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        interpret=interpret,
    )
