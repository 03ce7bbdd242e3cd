"""Paged KV cache layout, per-step attention metadata, and the pure-jnp (`xla`) attention.

The cache is one block array per K and V, stacked over layers; a token's KV lives at flat slot
`block_id * block_size + offset`. Block 0 is the null block: padding tokens write there and the
block manager never hands it out. The `xla` attention below is the CPU backend; it and every
Pallas kernel are tested against one readable reference,
`pallas_kernels.ragged_paged_attention.reference.ref_paged_attention`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v"], meta_fields=[])
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    v: jax.Array  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["slot_mapping", "token_req_idx", "block_tables", "kv_lens", "cu_q_lens"],
    meta_fields=[],
)
@dataclasses.dataclass
class AttentionMetadata:
    # i32[T] flat cache slot each token's K/V is written to (padding tokens: slot 0, null block)
    slot_mapping: jax.Array
    # i32[T] row of block_tables the token belongs to (padding tokens: 0)
    token_req_idx: jax.Array
    # i32[R, B] block ids of each request (unused entries: 0, the null block)
    block_tables: jax.Array
    # i32[R] tokens with KV after this step, per request (padding rows: 0)
    kv_lens: jax.Array
    # i32[R + 1] cumulative query lengths; rows past the real requests repeat the total
    cu_q_lens: jax.Array


def write_kv(
    cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim] one layer
    new: jax.Array,  # [T, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # i32[T]
) -> jax.Array:
    """Scatters this step's K or V into the paged cache (in place under donation)."""
    nb, bs, hkv, d = cache.shape
    flat = cache.reshape(nb * bs, hkv, d)
    return flat.at[slot_mapping].set(new.astype(cache.dtype)).reshape(nb, bs, hkv, d)


# Keys per step of xla_paged_attention's loop over the context: small enough that one step's
# gathered K/V stays in cache, large enough that the loop overhead does not show (measured on
# a 2-core CPU: 32 keys beat 16 and 64-128 by 20-40%).
_KEYS_PER_CHUNK = 32


def xla_paged_attention(
    q: jax.Array,  # [T, num_q_heads, head_dim]
    k_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim] one layer
    v_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    positions: jax.Array,  # i32[T] position of each query token in its request
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:  # [T, num_q_heads, head_dim]
    """The reference attention (pallas_kernels' ref_paged_attention) computed over chunks of
    blocks with an online softmax.

    NOTE: gathering the whole context per token materialises T x S x kv_heads x head_dim
    floats per layer, and on CPU that memory traffic, not the math, was the cost. Walking the
    block table a chunk at a time keeps each gathered piece small. Chunks past a request's
    length are fully masked and leave the running max, sum and output bit-for-bit unchanged,
    so the result does not depend on the block-table bucket (batched == alone). With one
    request row (R == 1, static: the embedder's chunks, or max_num_seqs=1) every token reads
    the same blocks, so each chunk of them is gathered once and shared, not copied per token.
    """
    t, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    b = md.block_tables.shape[1]
    group = hq // hkv
    # The same chunk whatever B is (the table is padded with null blocks, which are masked),
    # so a request's arithmetic does not depend on its batch-mates.
    blocks_per_chunk = max(1, _KEYS_PER_CHUNK // bs)
    num_chunks = -(-b // blocks_per_chunk)
    chunk_keys = blocks_per_chunk * bs
    one_request = md.block_tables.shape[0] == 1
    pad = num_chunks * blocks_per_chunk - b
    if one_request:
        tables = jnp.pad(md.block_tables, ((0, 0), (0, pad)))  # [1, B]: shared by every token
        kv_shape: tuple[int, ...] = (chunk_keys, hkv, d)
        qk, pv = "tkgd,skd->tkgs", "tkgs,skd->tkgd"
    else:
        tables = jnp.pad(md.block_tables[md.token_req_idx], ((0, 0), (0, pad)))  # [T, B]
        kv_shape = (t, chunk_keys, hkv, d)
        qk, pv = "tkgd,tskd->tkgs", "tkgs,tskd->tkgd"
    qg = q.reshape(t, hkv, group, d).astype(jnp.float32) * sm_scale

    def step(carry, j):
        m_prev, l_prev, acc = carry  # [T, K, G], [T, K, G], [T, K, G, D]
        blocks = jax.lax.dynamic_slice_in_dim(tables, j * blocks_per_chunk, blocks_per_chunk, 1)
        k = k_cache[blocks].reshape(kv_shape).astype(jnp.float32)
        v = v_cache[blocks].reshape(kv_shape).astype(jnp.float32)
        scores = jnp.einsum(qk, qg, k)
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        key_pos = j * chunk_keys + jnp.arange(chunk_keys, dtype=jnp.int32)
        mask = key_pos[None, :] <= positions[:, None]
        if sliding_window is not None:
            mask &= key_pos[None, :] > positions[:, None] - sliding_window
        scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
        m_new = jnp.maximum(m_prev, scores.max(axis=-1))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(scores - m_new[..., None])
        l_new = alpha * l_prev + p.sum(axis=-1)
        acc = acc * alpha[..., None] + jnp.einsum(pv, p, v)
        return (m_new, l_new, acc), None

    # Every token sees at least key 0 of its request (position >= 0), so m is finite after
    # the first chunk; the finite initial max avoids inf - inf.
    init = (
        jnp.full((t, hkv, group), -1e30, jnp.float32),
        jnp.zeros((t, hkv, group), jnp.float32),
        jnp.zeros((t, hkv, group, d), jnp.float32),
    )
    (_, l_final, acc), _ = jax.lax.scan(step, init, jnp.arange(num_chunks))
    return (acc / l_final[..., None]).reshape(t, hq, d).astype(q.dtype)
