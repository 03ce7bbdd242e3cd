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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxserve.model import tiles


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
    data_fields=[
        "slot_mapping",
        "token_req_idx",
        "block_tables",
        "kv_lens",
        "cu_q_lens",
        "tile_starts",
        "tile_lens",
        "wide_tile_starts",
        "wide_tile_lens",
    ],
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
    # i32[max(1, T // 2)] first token of each prefill query tile (query_tiles); padding: 0.
    # None: the xla attention derives them from cu_q_lens (the embedder, tests)
    tile_starts: jax.Array | None = None
    # i32[max(1, T // 2)] real tokens in each tile, tiles packed first (padding tiles: 0)
    tile_lens: jax.Array | None = None
    # i32[max(1, T // WIDE_QUERY_TILE)] first token of each wide tile (query_tiles); padding: 0.
    # None with tile_starts (derived from cu_q_lens)
    wide_tile_starts: jax.Array | None = None
    # i32[max(1, T // WIDE_QUERY_TILE)] WIDE_QUERY_TILE per wide tile, packed first (padding: 0)
    wide_tile_lens: jax.Array | None = None


# A bf16 cache on CPU is stored as its uint16 bit patterns (kv_storage_dtype).
BF16_BITS = jnp.dtype(jnp.uint16)


def kv_storage_dtype(dtype: jnp.dtype, platform: str, backend: str) -> jnp.dtype:
    """What the cache's arrays hold for KV of `dtype`.

    NOTE: XLA:CPU has no bf16 gather or scatter: it converts the operand to f32, which for
    the attention's gather is the whole layer-stacked cache, in every layer of every step.
    Integers it moves as they are, so the xla backend on CPU keeps bf16 KV as uint16 bits and
    bitcasts what it gathered (`to_f32`); the Pallas kernels take real bf16.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16 and platform == "cpu" and backend == "xla":
        return BF16_BITS
    return dtype


def to_f32(x: jax.Array) -> jax.Array:
    """Gathered K or V in f32, from any storage dtype (bf16 bits included)."""
    if x.dtype == BF16_BITS:
        x = jax.lax.bitcast_convert_type(x, jnp.bfloat16)
    return x.astype(jnp.float32)


def write_kv(
    cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim] one layer
    new: jax.Array,  # [T, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # i32[T]
) -> jax.Array:
    """Scatters this step's K or V into the paged cache (in place under donation)."""
    nb, bs, hkv, d = cache.shape
    flat = cache.reshape(nb * bs, hkv, d)
    if cache.dtype == BF16_BITS:
        new = jax.lax.bitcast_convert_type(new.astype(jnp.bfloat16), BF16_BITS)
    return flat.at[slot_mapping].set(new.astype(cache.dtype)).reshape(nb, bs, hkv, d)


# Keys per step of every walk over a context: small enough that one step's gathered K/V for
# every decode row stays in cache, large enough that the loop overhead does not show
# (measured on a 2-core CPU: 32 keys beat 16 and 64-128 by 20-40%). The online softmax's
# rounding depends on where the chunks split the keys, so the split is fixed by key position
# (_key_chunks): a token gets the same bits however its prompt was cut into tiles.
_CHUNK_KEYS = 32
# Keys per chunk of a prefill tile past its first _TILE_CHUNK_KEYS keys (_key_chunks). A
# decode and the same token in a tile agree to a few ulps, not to the bit, in any case (their
# dots differ in shape: tests/model/test_attention.py), so the two walks need not split alike.
_TILE_CHUNK_KEYS = 128
# Fewest rows the per-token path runs (padded with rows that see nothing): XLA:CPU vectorises
# the softmax's fused reductions differently below 32 rows, and a decode then got other bits
# than the same token in a query tile (measured: 2-16 rows differ in the last bit, 32 and 64
# match), so a token's bits would depend on how many requests shared its step.
_MIN_DECODE_ROWS = 32


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
    """The reference attention (pallas_kernels' ref_paged_attention), computed a chunk of keys
    at a time with an online softmax: per token for requests with one query token this step
    (decodes), per query tile for the rest (prefill chunks). Tokens of no request (the step's
    padding) get zeros.

    NOTE: on CPU the memory traffic of gathering the context, not the math, is the cost.
    Gathering per token would copy a 512-token prefill chunk's context 512 times; a tile of
    QUERY_TILE (or WIDE_QUERY_TILE) tokens shares one gather. Each walk over the keys stops at
    the last key its rows can see (a dynamic trip count), so a step costs what its contexts
    hold, not what the block-table bucket could hold. A chunk a row cannot see leaves its
    running max, sum and output bit-for-bit unchanged, so a row's result does not depend on
    its batch-mates or on the bucket (batched == alone).
    """
    t, hq, d = q.shape
    out = jnp.zeros((t, hq, d), jnp.float32)
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    out = _decode_rows(out, q, k_cache, v_cache, positions, md, **kw)
    narrow = md.tile_starts, md.tile_lens
    wide = md.wide_tile_starts, md.wide_tile_lens
    if any(x is None for x in (*narrow, *wide)):
        narrow, wide = tiles.query_tiles(md.cu_q_lens, t, jnp)
    args = (q, k_cache, v_cache, positions, md)
    if t >= tiles.WIDE_QUERY_TILE:  # smaller steps have no wide tile: no loop to compile
        out = _prefill_tiles(out, *args, *wide, size=tiles.WIDE_QUERY_TILE, **kw)
    out = _prefill_tiles(out, *args, *narrow, size=tiles.QUERY_TILE, **kw)
    return out.astype(q.dtype)


def _decode_rows(
    out: jax.Array,  # f32[T, num_q_heads, head_dim]
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    positions: jax.Array,
    md: AttentionMetadata,
    **kw: Any,
) -> jax.Array:
    """Rows with exactly one query token: each gathers its own blocks, all rows per step."""
    t, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    group = hq // hkv
    q_lens = md.cu_q_lens[1:] - md.cu_q_lens[:-1]
    is_decode = q_lens == 1
    tok = jnp.where(is_decode, md.cu_q_lens[:-1], 0)  # [R]
    pos = jnp.where(is_decode, positions[tok], -1)  # -1: the row sees no key
    if tok.shape[0] < _MIN_DECODE_ROWS:  # rows that see nothing, so the rounding is a batch's
        extra = _MIN_DECODE_ROWS - tok.shape[0]
        is_decode = jnp.pad(is_decode, (0, extra))
        tok, pos = jnp.pad(tok, (0, extra)), jnp.pad(pos, (0, extra), constant_values=-1)
        tables = jnp.pad(md.block_tables, ((0, extra), (0, 0)))
    else:
        tables = md.block_tables
    n = tok.shape[0]
    qg = q[tok].reshape(n, hkv, group, d).astype(jnp.float32) * kw["sm_scale"]

    def chunk(blocks: jax.Array, key_pos: jax.Array) -> tuple[jax.Array, Callable]:
        kv_shape = (n, key_pos.shape[0], hkv, d)
        k = to_f32(k_cache[blocks].reshape(kv_shape))  # blocks: [R, blocks per chunk]
        v = to_f32(v_cache[blocks].reshape(kv_shape))
        v = jnp.where((key_pos[None, :] <= pos[:, None])[:, :, None, None], v, 0.0)
        scores = jnp.einsum("nkgd,nskd->nkgs", qg, k)  # [R, K, G, S]
        return scores, lambda p: jnp.einsum("nkgs,nskd->nkgd", p, v)

    acc, l_final = _walk(
        chunk,
        tables,
        pos,
        _key_chunks(bs, tile=False),
        bs,
        (n, hkv, group),
        d,
        pos[:, None, None, None],
        **kw,
    )
    rows = (acc / l_final[..., None]).reshape(n, hq, d)
    return out.at[jnp.where(is_decode, tok, t)].set(rows, mode="drop")


def _prefill_tiles(
    out: jax.Array,  # f32[T, num_q_heads, head_dim]
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    positions: jax.Array,
    md: AttentionMetadata,
    starts: jax.Array,
    lens: jax.Array,
    *,
    size: int,
    **kw: Any,
) -> jax.Array:
    """Query tiles: a tile's `size` tokens share one walk over their request's blocks.

    Inside a tile everything is kv-head-major ([K, tile * G, ...]), the layout the dots take,
    so XLA transposes only the gathered keys and values, not the scores."""
    t, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    group = hq // hkv
    offsets = jnp.arange(size, dtype=jnp.int32)
    phases = _key_chunks(bs, tile=True)

    def tile(i: jax.Array, out: jax.Array) -> jax.Array:
        valid = offsets < lens[i]
        idx = jnp.minimum(starts[i] + offsets, t - 1)
        pos = jnp.where(valid, positions[idx], -1)
        table = md.block_tables[md.token_req_idx[starts[i]]][None]  # [1, B]
        qg = q[idx].reshape(size, hkv, group, d).astype(jnp.float32) * kw["sm_scale"]
        qg = qg.transpose(1, 0, 2, 3).reshape(hkv, size * group, d)
        row_pos = jnp.repeat(pos, group)[None, :, None]  # [1, tile * G, 1]
        last = jnp.max(pos)

        def chunk(blocks: jax.Array, key_pos: jax.Array) -> tuple[jax.Array, Callable]:
            kv_shape = (key_pos.shape[0], hkv, d)
            k = to_f32(k_cache[blocks[0]].reshape(kv_shape))  # blocks: [1, blocks per chunk]
            v = to_f32(v_cache[blocks[0]].reshape(kv_shape))
            v = jnp.where((key_pos <= last)[:, None, None], v, 0.0)
            scores = jnp.einsum("kqd,skd->kqs", qg, k)  # [K, tile * G, S]
            return scores, lambda p: jnp.einsum("kqs,skd->kqd", p, v)

        acc, l_final = _walk(chunk, table, pos, phases, bs, (hkv, size * group), d, row_pos, **kw)
        rows = (acc / l_final[..., None]).reshape(hkv, size, group, d)
        rows = rows.transpose(1, 0, 2, 3).reshape(size, hq, d)
        return out.at[jnp.where(valid, idx, t)].set(rows, mode="drop")

    return jax.lax.fori_loop(0, jnp.sum(lens > 0), tile, out)


def _key_chunks(block_size: int, *, tile: bool) -> tuple[tuple[int, int], ...]:
    """How a walk cuts the keys: (first key, blocks per chunk) of each phase, the last phase
    open-ended. Fixed by key position alone, never by the step, so a token's bits do not
    depend on how its prompt was split.

    Decodes walk _CHUNK_KEYS at a time. A tile walks its first _TILE_CHUNK_KEYS keys that way
    too, then _TILE_CHUNK_KEYS at a time: a long prompt's tiles run a few large dots instead
    of many small ones (measured on a 2-core CPU: a 1024-token prompt's attention 1.6x
    faster), while a short prompt computes no masked keys past its end (128-key chunks from
    the start made a 32-token prompt's tiles 2x slower).
    """
    small = max(1, _CHUNK_KEYS // block_size)
    if not tile:
        return ((0, small),)
    big = max(small, _TILE_CHUNK_KEYS // block_size)
    if big == small:
        return ((0, small),)
    return ((0, small), (big * block_size, big))


def _walk(
    chunk: Callable,  # (blocks [N or 1, per chunk], key positions [S]) -> (scores, p -> p @ V)
    tables: jax.Array,  # i32[N or 1, B]
    pos: jax.Array,  # i32[N] the queries' positions (-1: sees nothing)
    phases: tuple[tuple[int, int], ...],  # _key_chunks
    block_size: int,
    row_shape: tuple[int, ...],  # the scores' shape without the key axis
    head_dim: int,
    row_pos: jax.Array,  # pos, shaped to broadcast against the scores [*row_shape, S]
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> tuple[jax.Array, jax.Array]:  # (unnormalised output [*row_shape, D], softmax sum)
    """The online softmax over the chunks of keys from the first any query can see to the
    last; a query that sees nothing ends with a sum of 1 and an output of 0."""
    del sm_scale  # already folded into q
    b = tables.shape[1]
    widest = max(per_chunk for _, per_chunk in phases)
    tables = jnp.pad(tables, ((0, 0), (0, -(-b // widest) * widest - b)))
    sees = pos >= 0
    lowest = 0
    if sliding_window is not None:  # chunks before every query's window are skipped
        lowest = jnp.min(jnp.where(sees, pos, jnp.iinfo(jnp.int32).max)) - sliding_window + 1

    def step_of(per_chunk: int) -> Callable:
        chunk_keys = per_chunk * block_size

        def step(j: jax.Array, carry: tuple) -> tuple:
            m_prev, l_prev, acc = carry
            blocks = jax.lax.dynamic_slice_in_dim(tables, j * per_chunk, per_chunk, 1)
            key_pos = j * chunk_keys + jnp.arange(chunk_keys, dtype=jnp.int32)
            scores, weigh = chunk(blocks, key_pos)
            if soft_cap is not None:
                scores = soft_cap * jnp.tanh(scores / soft_cap)
            mask = key_pos <= row_pos
            if sliding_window is not None:
                mask &= key_pos > row_pos - sliding_window
            scores = jnp.where(mask, scores, -jnp.inf)
            m_new = jnp.maximum(m_prev, scores.max(axis=-1))
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.exp(scores - m_new[..., None])
            return m_new, alpha * l_prev + p.sum(axis=-1), acc * alpha[..., None] + weigh(p)

        return step

    # A finite initial max avoids inf - inf; a chunk a query cannot see leaves its state
    # bit-for-bit unchanged (alpha = 1, p = 0). `chunk` zeroes the values of keys no query
    # sees (slots past a request's length hold another request's or no KV), since p = 0
    # times a non-finite value would still poison the sum.
    carry = (
        jnp.full(row_shape, -1e30, jnp.float32),
        jnp.zeros(row_shape, jnp.float32),
        jnp.zeros((*row_shape, head_dim), jnp.float32),
    )
    for i, (first_key, per_chunk) in enumerate(phases):
        chunk_keys = per_chunk * block_size
        # this phase's chunks: from its first key (or the window's) to the last key any
        # query sees (none when no query sees anything), short of the next phase
        stop = (jnp.max(pos) + chunk_keys) // chunk_keys
        if i + 1 < len(phases):
            stop = jnp.minimum(stop, phases[i + 1][0] // chunk_keys)
        start = jnp.maximum(first_key // chunk_keys, lowest // chunk_keys)
        carry = jax.lax.fori_loop(start, jnp.maximum(start, stop), step_of(per_chunk), carry)
    _, l_final, acc = carry
    return acc, jnp.where(l_final > 0, l_final, 1.0)
