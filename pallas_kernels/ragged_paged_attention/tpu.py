"""Ragged paged attention for TPU (Mosaic TPU): one kernel over decode tokens and prefill chunks.

Grid: (num_kv_heads, query tiles of `q_block` tokens); both axes independent ("parallel", so
megacore chips split them). One grid step owns the output rows of one KV head's query-head
group for `q_block` consecutive flat tokens, which may belong to several requests (a tile of
decode tokens covers `q_block` requests). Inside the step a single loop walks the
(request, KV chunk) pairs that touch the tile; a chunk is `kv_pages_per_chunk` pages of the
request's block table. Block tables, lengths and cumulative query lengths are scalar-prefetched
into SMEM; K/V stay in HBM (memory_space=ANY) and each chunk is copied page by page into one of
two VMEM buffers with async DMAs, the next chunk's copy running while this one is computed
(double buffering). Scores use an online softmax in float32 scratch.

KV layout: the engine's [num_blocks, block_size, num_kv_heads, head_dim], read per head: page
`p`, head `h` is the strided slice [p, :, h, :] (block_size rows of head_dim contiguous
elements) and lands in VMEM as a dense [keys, head_dim] tile, so VMEM holds no head padding
whatever num_kv_heads is. See pallas_kernels/NOTES.md for why not another layout.

Queries are re-laid out outside the kernel as [kv_head, group, token, head_dim] so that one
BlockSpec block is a (group, q_block, head_dim) slab: the matmul sees group * q_block rows
against one K tile (GQA costs no extra KV reads), and the tile's two minor dims are
(tokens, head_dim), aligned to the (8|16, 128) hardware tiles for any group size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Keys per KV chunk when the caller does not choose: 256 keys x 128 lanes x 4 B x 2 (K, V) x 2
# buffers = 512 KiB of VMEM for float32, far below v5e/v6e scoped VMEM (16/32 MiB), and long
# enough that one chunk's DMAs (>= 64 KiB) amortise their issue cost.
_DEFAULT_CHUNK_KEYS = 256
# Query tokens per tile when the caller does not choose (see NOTES.md: KV is re-read once per
# tile, so prefill wants big tiles; decode rows are group * tokens).
_DEFAULT_Q_BLOCK = 32
# Finite initial running max: a row no key has touched yet keeps alpha = exp(0) = 1 and p = 0
# (an -inf start would give exp(-inf - -inf) = NaN).
_M_INIT = -1e30


def sublane_multiple(dtype: jnp.dtype) -> int:
    """Rows per (sublane x lane) hardware tile for `dtype`: 8 for 32-bit, 16 for 16-bit."""
    return 8 * (4 // jnp.dtype(dtype).itemsize)


def default_knobs(
    num_tokens: int, block_size: int, pages_per_seq: int, dtype: jnp.dtype
) -> tuple[int, int]:  # (q_block, kv_pages_per_chunk)
    """The tile sizes used when the caller passes None (the engine does)."""
    sub = sublane_multiple(dtype)
    padded_t = -(-num_tokens // sub) * sub
    q_block = min(_DEFAULT_Q_BLOCK, padded_t)
    q_block = -(-q_block // sub) * sub
    pages = max(1, min(pages_per_seq, _DEFAULT_CHUNK_KEYS // block_size))
    return q_block, pages


def _kernel(
    # scalar prefetch (SMEM)
    kv_lens_ref,  # i32[R]
    tables_ref,  # i32[R * B] flattened block tables (B padded to a multiple of the chunk)
    cu_ref,  # i32[R + 1]
    tile_r0_ref,  # i32[num_tiles] first request touching each query tile
    tile_r1_ref,  # i32[num_tiles] one past the last request touching it
    # inputs
    q_ref,  # VMEM [group, q_block, D] this tile's queries of one KV head's group
    k_hbm,  # HBM [num_blocks, block_size, Hkv, D]
    v_hbm,  # HBM [num_blocks, block_size, Hkv, D]
    # output
    o_ref,  # VMEM [group, q_block, D]
    # scratch
    k_buf,  # VMEM [2, chunk_keys, D] double buffer
    v_buf,  # VMEM [2, chunk_keys, D]
    sems,  # DMA semaphores [2 (K, V), 2 (buffer)]
    m_ref,  # VMEM f32[group * q_block, 128] running max (lane-replicated)
    l_ref,  # VMEM f32[group * q_block, 128] running denominator (lane-replicated)
    acc_ref,  # VMEM f32[group * q_block, D] running numerator
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    block_size: int,
    pages_per_chunk: int,
    pages_per_seq: int,
):
    h = pl.program_id(0)
    qi = pl.program_id(1)
    group, q_block, d = q_ref.shape
    rows = group * q_block
    chunk_keys = pages_per_chunk * block_size
    tile_lo = qi * q_block
    tile_hi = tile_lo + q_block
    r_end = tile_r1_ref[qi]
    last_row = kv_lens_ref.shape[0] - 1

    def bounds(r):
        """This tile's part of request r: query rows, key range [k_lo, k_hi), chunk range."""
        r = jnp.minimum(r, last_row)  # r == r_end may be past the arrays; result unused then
        q_start, q_end, kv_len = cu_ref[r], cu_ref[r + 1], kv_lens_ref[r]
        lo_tok = jnp.maximum(q_start, tile_lo)
        hi_tok = jnp.minimum(q_end, tile_hi)
        # Token t sits at position kv_len - (q_end - t); the tile's last token bounds the keys.
        k_hi = kv_len - q_end + hi_tok
        k_lo = jnp.int32(0)
        if sliding_window is not None:
            k_lo = jnp.maximum(k_lo, kv_len - q_end + lo_tok - sliding_window + 1)
        c_lo = k_lo // chunk_keys
        c_hi = (k_hi + chunk_keys - 1) // chunk_keys
        c_hi = jnp.where((hi_tok > lo_tok) & (k_hi > 0), c_hi, c_lo)  # no rows here: empty
        return q_start, q_end, kv_len, k_lo, k_hi, c_lo, c_hi

    def first_busy(r):
        """The first request >= r with work in this tile (r_end if none)."""

        def empty(r):
            _, _, _, _, _, c_lo, c_hi = bounds(r)
            return (r < r_end) & (c_hi <= c_lo)

        return jax.lax.while_loop(empty, lambda r: r + 1, r)

    def chunk_copies(r, j, buf, start: bool):
        """Starts (or waits for) the page DMAs of chunk j of request r into buffer `buf`.

        Only pages holding keys in [k_lo, k_hi) are copied: pages past the context (null or
        stale blocks) are never read, and compute masks the buffer rows they would fill.
        """
        _, _, _, k_lo, k_hi, _, _ = bounds(r)

        def page_copy(p, _):
            page_idx = j * pages_per_chunk + p

            @pl.when((page_idx * block_size < k_hi) & ((page_idx + 1) * block_size > k_lo))
            def _():
                page = tables_ref[r * pages_per_seq + page_idx]
                for kind, (src, dst) in enumerate(((k_hbm, k_buf), (v_hbm, v_buf))):
                    copy = pltpu.make_async_copy(
                        src.at[page, :, h, :],
                        dst.at[buf, pl.ds(p * block_size, block_size), :],
                        sems.at[kind, buf],
                    )
                    if start:
                        copy.start()
                    else:
                        copy.wait()

        # A loop, not a Python unroll: the kernel body stays small (compile time) whatever
        # the chunk width; the per-page scalar work is a few SMEM reads.
        jax.lax.fori_loop(0, pages_per_chunk, page_copy, None)

    def compute(r, j, buf):
        q_start, q_end, kv_len, k_lo, k_hi, _, _ = bounds(r)
        q = q_ref[...].reshape(rows, d)
        k = k_buf[buf]  # [chunk_keys, D]
        v = v_buf[buf]
        s = jax.lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )  # [rows, chunk_keys]
        s = s * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        tok = tile_lo + jax.lax.broadcasted_iota(jnp.int32, (q_block, chunk_keys), 0)
        key = j * chunk_keys + jax.lax.broadcasted_iota(jnp.int32, (q_block, chunk_keys), 1)
        pos = kv_len - q_end + tok
        mask = (tok >= q_start) & (tok < q_end) & (key <= pos)
        if sliding_window is not None:
            mask &= key > pos - sliding_window
        mask = jnp.broadcast_to(mask[None], (group, q_block, chunk_keys)).reshape(rows, chunk_keys)
        # Masking by select (not by adding -inf) drops NaN/garbage scores of keys that were
        # never copied this chunk; p is then exactly 0 there.
        s = jnp.where(mask, s, -jnp.inf)
        m_prev = m_ref[...][:, :1]
        l_prev = l_ref[...][:, :1]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        l_new = alpha * l_prev + p.sum(axis=1, keepdims=True)
        # 0 * NaN is NaN: buffer rows outside [k_lo, k_hi) hold stale or uncopied data.
        v_key = j * chunk_keys + jax.lax.broadcasted_iota(jnp.int32, (chunk_keys, d), 0)
        v = jnp.where((v_key >= k_lo) & (v_key < k_hi), v, jnp.zeros_like(v))
        pv = jax.lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        acc_ref[...] = alpha * acc_ref[...] + pv
        m_ref[...] = jnp.broadcast_to(m_new, m_ref.shape)
        l_ref[...] = jnp.broadcast_to(l_new, l_ref.shape)

    m_ref[...] = jnp.full(m_ref.shape, _M_INIT, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    r = first_busy(tile_r0_ref[qi])
    j = bounds(r)[5]

    @pl.when(r < r_end)
    def _():
        chunk_copies(r, j, 0, start=True)

    def body(carry):
        r, j, buf = carry
        c_hi = bounds(r)[6]
        same = j + 1 < c_hi
        nr = jnp.where(same, r, first_busy(r + 1))
        nj = jnp.where(same, j + 1, bounds(nr)[5])

        @pl.when(nr < r_end)
        def _():
            chunk_copies(nr, nj, 1 - buf, start=True)  # overlaps with the compute below

        chunk_copies(r, j, buf, start=False)
        compute(r, j, buf)
        return nr, nj, 1 - buf

    jax.lax.while_loop(lambda c: c[0] < r_end, body, (r, j, jnp.int32(0)))

    denom = l_ref[...][:, :1]
    # Rows no key reached (padding tokens, other requests' rows) have denom 0 and output 0.
    out = jnp.where(denom > 0, acc_ref[...] / jnp.where(denom > 0, denom, 1.0), 0.0)
    o_ref[...] = out.reshape(group, q_block, d).astype(o_ref.dtype)


def _interpret_arg(interpret: bool | pltpu.InterpretParams):
    # Plain `interpret=True` has no TPU DMA/semaphore model; the TPU interpreter does, and it
    # fills uninitialised VMEM with NaN, so a stray read of an uncopied buffer row shows up.
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret or False


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "sliding_window",
        "soft_cap",
        "q_block",
        "kv_pages_per_chunk",
        "vmem_limit_bytes",
        "interpret",
    ),
)
def ragged_paged_attention_tpu(
    q: jax.Array,  # [T, Hq, D]
    k_cache: jax.Array,  # [num_blocks, block_size, Hkv, D]
    v_cache: jax.Array,  # [num_blocks, block_size, Hkv, D]
    kv_lens: jax.Array,  # i32[R]
    block_tables: jax.Array,  # i32[R, B]
    cu_q_lens: jax.Array,  # i32[R + 1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    q_block: int | None = None,  # query tokens per tile (multiple of 8 f32 / 16 bf16)
    kv_pages_per_chunk: int | None = None,  # pages per DMA'd KV chunk
    vmem_limit_bytes: int | None = None,  # Mosaic scoped-VMEM limit override
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:  # [T, Hq, D]; rows of padding tokens are 0
    """The Mosaic TPU kernel; inputs are assumed valid (the public entry checks them)."""
    t, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    r, b = block_tables.shape
    group = hq // hkv
    dq, dp = default_knobs(t, bs, b, q.dtype)
    q_block = q_block or dq
    ppc = kv_pages_per_chunk or dp
    num_tiles = -(-t // q_block)
    t_pad = num_tiles * q_block
    b_pad = -(-b // ppc) * ppc

    tables = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, b_pad - b))).reshape(-1)
    cu = cu_q_lens.astype(jnp.int32)
    n = num_seqs.astype(jnp.int32)[0]
    tile_lo = jnp.arange(num_tiles, dtype=jnp.int32) * q_block
    # Requests touching tile [lo, lo + q_block): cu[r + 1] > lo and cu[r] < lo + q_block.
    tile_r0 = jnp.minimum(jnp.searchsorted(cu[1:], tile_lo, side="right"), n).astype(jnp.int32)
    tile_r1 = jnp.searchsorted(cu[:-1], tile_lo + q_block, side="left").astype(jnp.int32)
    tile_r1 = jnp.minimum(tile_r1, n)

    qx = jnp.pad(q, ((0, t_pad - t), (0, 0), (0, 0)))
    qx = qx.reshape(t_pad, hkv, group, d).transpose(1, 2, 0, 3)  # [Hkv, G, T_pad, D]
    rows = group * q_block
    chunk_keys = ppc * bs
    kernel = functools.partial(
        _kernel,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        block_size=bs,
        pages_per_chunk=ppc,
        pages_per_seq=b_pad,
    )
    tile_spec = pl.BlockSpec((None, group, q_block, d), lambda h, i, *_: (h, 0, i, 0))
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(hkv, num_tiles),
            in_specs=[
                tile_spec,
                pl.BlockSpec(memory_space=pl.ANY),
                pl.BlockSpec(memory_space=pl.ANY),
            ],
            out_specs=tile_spec,
            scratch_shapes=[
                pltpu.VMEM((2, chunk_keys, d), k_cache.dtype),
                pltpu.VMEM((2, chunk_keys, d), v_cache.dtype),
                pltpu.SemaphoreType.DMA((2, 2)),
                pltpu.VMEM((rows, 128), jnp.float32),
                pltpu.VMEM((rows, 128), jnp.float32),
                pltpu.VMEM((rows, d), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(qx.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel"),
            vmem_limit_bytes=vmem_limit_bytes,
        ),
        interpret=_interpret_arg(interpret),
        name="ragged_paged_attention_tpu",
    )(kv_lens.astype(jnp.int32), tables, cu, tile_r0, tile_r1, qx, k_cache, v_cache)
    out = out.transpose(2, 0, 1, 3).reshape(t_pad, hq, d)
    return out[:t]
