"""The pure-jnp reference of ragged paged attention, in the kernels' calling convention.

`ref_paged_attention` is the one readable oracle: per-token positions and request rows, as the
engine's `xla` backend takes them (the engine's tests import it from here; this package never
imports jaxserve). The kernels take what the hardware wants (per-request lengths and block tables,
cumulative query lengths, a count of real requests); `ref_ragged_paged_attention` maps that
onto the first, so the kernels and the engine share one oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Upper bound on the elements of one gathered K (tokens x context x kv heads x head_dim) before
# the attention is split into token chunks, to keep CPU memory per layer bounded (~128 MiB f32).
_MAX_GATHER_ELEMS = 1 << 25


def ref_paged_attention(
    q: jax.Array,  # [T, num_q_heads, head_dim]
    k_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim] one layer
    v_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    positions: jax.Array,  # i32[T] position of each query token in its request
    token_req_idx: jax.Array,  # i32[T] row of block_tables each token belongs to
    block_tables: jax.Array,  # i32[R, B] block ids of each request (unused: 0, the null block)
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:  # [T, num_q_heads, head_dim]
    """Ragged paged attention in plain jnp: each token attends to its own request's blocks.

    Causality comes from positions: a token sees keys at positions <= its own (every such key
    was written this step or earlier), so prefill chunks and decodes mix freely in one batch.
    The readable reference (one softmax over the whole gathered context): the engine's `xla`
    backend (jaxserve.model.attention.xla_paged_attention) computes the same thing a few blocks
    at a time, and the Pallas kernels are checked against it through ref_ragged_paged_attention.
    """
    t, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    b = block_tables.shape[1]
    s = b * bs
    group = hq // hkv
    key_pos = jnp.arange(s, dtype=jnp.int32)

    def attend(q_c, pos_c, req_c):  # one chunk of tokens
        tables = block_tables[req_c]  # [Tc, B]
        k = k_cache[tables].reshape(-1, s, hkv, d)
        v = v_cache[tables].reshape(-1, s, hkv, d)
        qg = q_c.reshape(-1, hkv, group, d).astype(jnp.float32)
        scores = jnp.einsum("tkgd,tskd->tkgs", qg, k.astype(jnp.float32)) * sm_scale
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        mask = key_pos[None, :] <= pos_c[:, None]
        if sliding_window is not None:
            mask &= key_pos[None, :] > pos_c[:, None] - sliding_window
        scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("tkgs,tskd->tkgd", probs, v.astype(jnp.float32))
        return out.reshape(-1, hq, d).astype(q.dtype)

    chunk = t
    while chunk > 1 and chunk * s * hkv * d > _MAX_GATHER_ELEMS and chunk % 2 == 0:
        chunk //= 2
    if chunk == t:
        return attend(q, positions, token_req_idx)
    n = t // chunk
    out = jax.lax.map(
        lambda args: attend(*args),
        (
            q.reshape(n, chunk, hq, d),
            positions.reshape(n, chunk),
            token_req_idx.reshape(n, chunk),
        ),
    )
    return out.reshape(t, hq, d)


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
    out = ref_paged_attention(
        q,
        k_cache,
        v_cache,
        pos,
        req,
        block_tables,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    return jnp.where(valid[:, None, None], out, jnp.zeros_like(out))
