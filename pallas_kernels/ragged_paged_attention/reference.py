"""The pure-jnp reference of ragged paged attention, in the kernels' calling convention.

The kernels take what the hardware wants (per-request lengths and block tables, cumulative
query lengths, a count of real requests); the engine's `xla` backend takes per-token positions
and request rows. This module maps the first onto the second and calls the engine's own
readable attention (`ref_paged_attention`), so the kernels and the engine share one oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.model.attention import AttentionMetadata, ref_paged_attention


def positions_from_lens(
    kv_lens: jax.Array,  # i32[R] tokens with KV after this step, per request
    cu_q_lens: jax.Array,  # i32[R + 1] cumulative query lengths
    num_seqs: jax.Array,  # i32[1] requests in use (rows past it are padding)
    num_tokens: int,  # T, the padded flat token count
) -> tuple[jax.Array, jax.Array, jax.Array]:  # (positions i32[T], request i32[T], valid b[T])
    """Per-token position and request row; a request's queries are its last q_len positions."""
    r = kv_lens.shape[0]
    tok = jnp.arange(num_tokens, dtype=jnp.int32)
    req = jnp.searchsorted(cu_q_lens[1:], tok, side="right").astype(jnp.int32)
    req = jnp.minimum(req, r - 1)
    valid = tok < cu_q_lens[num_seqs[0]]
    pos = kv_lens[req] - (cu_q_lens[req + 1] - tok)
    return jnp.where(valid, pos, 0), jnp.where(valid, req, 0), valid


def ref_ragged_paged_attention(
    q: jax.Array,  # [T, num_q_heads, head_dim]
    k_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    kv_lens: jax.Array,  # i32[R]
    block_tables: jax.Array,  # i32[R, B]
    cu_q_lens: jax.Array,  # i32[R + 1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:  # [T, num_q_heads, head_dim]; rows of padding tokens are 0
    """Causal ragged paged attention over f32 math; padding tokens (past the last real
    request's queries) get zero rows.

    NOTE: masked keys are dropped by a -inf score, so a NaN in an unused block still poisons
    this reference (0 * NaN); tests poison the kernel's input only and feed this the clean one.
    """
    t = q.shape[0]
    pos, req, valid = positions_from_lens(kv_lens, cu_q_lens, num_seqs, t)
    md = AttentionMetadata(
        slot_mapping=jnp.zeros((t,), jnp.int32),
        token_req_idx=req,
        block_tables=block_tables,
        kv_lens=kv_lens,
        cu_q_lens=cu_q_lens,
    )
    out = ref_paged_attention(
        q,
        k_cache,
        v_cache,
        pos,
        md,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    return jnp.where(valid[:, None, None], out, jnp.zeros_like(out))
