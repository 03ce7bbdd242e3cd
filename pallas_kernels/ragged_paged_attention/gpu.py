"""Ragged paged attention for Hopper GPUs, written for Mosaic GPU (Pallas `plgpu`).

One kernel serves the whole mixed batch (prefill chunks and decodes). The work is cut into
*tiles* of 64 query rows, where a row is one (token, q-head) pair of one KV head's GQA group
(GQA packing: a decode token of an 8:1 model fills 8 rows, so small groups still feed the
64-row WGMMA). Each CUDA block owns (tile, kv_head, kv_split): it TMA-copies its query rows
once, then streams its share of the request's KV pages into double-buffered shared memory
(one TMA per page, gathered through the block table), runs S = Q K^T and O += P V on the
tensor cores (WGMMA) with an online softmax, and writes an f32 partial output plus its
log-sum-exp. A small XLA epilogue merges the kv splits (split-K) and scatters tile rows back
to the [T, Hq, D] layout. pallas_kernels/NOTES.md (CUDA section): grid, bounds, roofline.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# Query rows per tile: one warpgroup's WGMMA M dimension on Hopper.
ROWS_PER_TILE = 64
# SMs on an H100 SXM; the split-K heuristic aims to give each of them a block.
_H100_SMS = 132
# Below this many keys per split a split costs more (partials, combine) than it saves.
_MIN_KEYS_PER_SPLIT = 512
_LOG2E = math.log2(math.e)
# Finite "minus infinity" for the running max: exp2(-inf - m) stays 0 and a row that has
# seen no key yet keeps alpha = exp2(m - m) = 1 instead of NaN.
_M_INIT = -1e30


def gpu_interpret_params():
    """The GPU interpreter's parameters (simulates TMA, barriers and WGMMA on the CPU)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def default_num_kv_splits(max_tiles: int, num_kv_heads: int, max_kv_len: int) -> int:
    """Split-K factor from static shapes: only when the blocks alone would leave SMs idle."""
    blocks = max_tiles * num_kv_heads
    if blocks >= _H100_SMS:
        return 1
    by_sms = -(-_H100_SMS // blocks)
    by_len = max(1, max_kv_len // _MIN_KEYS_PER_SPLIT)
    return max(1, min(by_sms, by_len, 16))


def _work_list(
    kv_lens: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array, group: int, max_tiles: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Tiles of ROWS_PER_TILE packed rows, each inside one request.

    Returns (tile_req i32[max_tiles] (-1: unused tile), tile_row0 i32[max_tiles] (first
    packed row, row = token * group + head_in_group), tile_start i32[R] (first tile of
    each request)).
    """
    r = kv_lens.shape[0]
    in_use = jnp.arange(r, dtype=jnp.int32) < num_seqs[0]
    q_lens = jnp.where(in_use, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    n_tiles = (q_lens * group + ROWS_PER_TILE - 1) // ROWS_PER_TILE
    ends = jnp.cumsum(n_tiles).astype(jnp.int32)
    starts = ends - n_tiles
    i = jnp.arange(max_tiles, dtype=jnp.int32)
    req = jnp.minimum(jnp.searchsorted(ends, i, side="right").astype(jnp.int32), r - 1)
    valid = i < ends[-1]
    row0 = cu_q_lens[req] * group + (i - starts[req]) * ROWS_PER_TILE
    return jnp.where(valid, req, -1), jnp.where(valid, row0, 0), starts


def _smem_transforms(dtype, head_dim: int) -> tuple:
    """128-byte swizzle over (8, 128 bytes) tiles: what TMA and WGMMA both read fast."""
    elems = 128 // jnp.dtype(dtype).itemsize
    if head_dim % elems:
        raise ValueError(f"head_dim={head_dim} must be a multiple of {elems} for {dtype}")
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(128))


def _kernel(
    qp_ref,  # [nq, Hkv, rows_pad, D] GQA-packed queries (nq=2: bf16 hi/lo parts of f32)
    k_ref,  # [num_blocks, bs, Hkv, D]
    v_ref,  # [num_blocks, bs, Hkv, D]
    kv_lens_ref,  # i32[R]
    bt_ref,  # i32[R, B]
    cu_ref,  # i32[R + 1]
    tile_req_ref,  # i32[max_tiles]
    tile_row0_ref,  # i32[max_tiles]
    o_ref,  # f32[S, max_tiles, Hkv, M, D] normalized partial outputs
    lse_ref,  # f32[S, max_tiles, Hkv, M] log2-sum-exp2 of each partial (-inf: empty)
    *scratch,
    group: int,
    block_size: int,
    block_kv: int,
    num_splits: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    interpret: bool,
    split_f32: bool,
):
    if split_f32:  # f32 cache: TMA lands f32 tiles, split into bf16 hi/lo operand buffers
        q_smem, k_smem, v_smem, kx_smem, vx_smem, o_smem, lse_smem, q_bar, k_bar, v_bar = scratch
    else:
        q_smem, k_smem, v_smem, o_smem, lse_smem, q_bar, k_bar, v_bar = scratch

    # Layout hints are semantics-free register-layout choices for the Mosaic GPU compiler; the
    # GPU interpreter has no rule for them (values there have no layout), so skip them there.
    def lay(x, layout):
        return x if interpret else plgpu.layout_cast(x, layout)

    def iota(shape, dim):
        return lay(lax.broadcasted_iota(jnp.int32, shape, dim), plgpu.Layout.WGMMA)

    def mma(acc, pairs, *, transpose_b: bool):
        """acc + sum(a @ b) over (a, b_ref) pairs (b^T if transpose_b), f32 accumulation.

        acc None: a fresh zero accumulator. Compiled: one WGMMA per pair (a from SMEM or
        registers, b from SMEM) into one accumulator: run_scoped for a fresh one, run_state
        to keep accumulating into `acc` in place. Interpreted: the GPU interpreter's WGMMA
        takes neither a transposed B nor a register A, nor runs run_state, so the same
        operands go through lax.dot_general (bf16 products, f32 sums, as on the tensor core).
        """
        if interpret:
            dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
            for a, b_ref in pairs:
                a_val = a if isinstance(a, jax.Array) else a[...]
                ab = lax.dot_general(a_val, b_ref[...], dims, preferred_element_type=jnp.float32)
                acc = ab if acc is None else acc + ab
            return acc

        def issue_mmas(acc_ref):
            for a, b_ref in pairs:
                b_op = plgpu.transpose_ref(b_ref, (1, 0)) if transpose_b else b_ref
                plgpu.wgmma(acc_ref, a, b_op)

        if acc is not None:  # run_state waits for the WGMMAs before handing acc back
            return pl.run_state(issue_mmas)(plgpu.ACC.init(acc))

        def fresh(acc_ref):
            issue_mmas(acc_ref)
            return acc_ref[...]

        b_ref = pairs[0][1]
        n = b_ref.shape[0] if transpose_b else b_ref.shape[1]
        return pl.run_scoped(fresh, plgpu.ACC((ROWS_PER_TILE, n), jnp.float32))

    m_rows = ROWS_PER_TILE
    head_dim = q_smem.shape[-1]
    pages = block_kv // block_size
    tile = lax.axis_index("tile")
    head = lax.axis_index("head")
    split = lax.axis_index("split")
    req = tile_req_ref[tile]

    @pl.when(req >= 0)
    def _():
        row0 = tile_row0_ref[tile]
        q_end = cu_ref[req + 1]
        kv_len = kv_lens_ref[req]
        pos_base = kv_len - q_end  # position of token t is pos_base + t
        tok_last = jnp.minimum((row0 + m_rows - 1) // group, q_end - 1)
        pos_first = pos_base + row0 // group
        pos_last = pos_base + tok_last
        kv_hi = pos_last + 1  # no row of this tile sees a key at or past kv_hi
        kv_lo = jnp.int32(0)
        if sliding_window is not None:
            kv_lo = jnp.maximum(pos_first - (sliding_window - 1), 0)
        c_lo = kv_lo // block_kv
        n_chunks = (kv_hi + block_kv - 1) // block_kv - c_lo
        per_split = (n_chunks + num_splits - 1) // num_splits
        c_begin = c_lo + split * per_split
        steps = jnp.clip(c_lo + n_chunks - c_begin, 0, per_split)
        last_page = (kv_len - 1) // block_size

        def issue(src_ref, dst_smem, bar, chunk, slot):
            # One TMA per page, all on one barrier (it expects `pages` arrivals). Pages past
            # the request's last are clamped to it: they are masked, never out of bounds.
            for j in range(pages):
                page = bt_ref[req, jnp.minimum(chunk * pages + j, last_page)]
                dst = dst_smem.at[slot, pl.ds(j * block_size, block_size)]
                plgpu.copy_gmem_to_smem(src_ref.at[page, :, head], dst, bar.at[slot])

        def issue_kv(chunk, slot):
            issue(k_ref, k_smem, k_bar, chunk, slot)
            issue(v_ref, v_smem, v_bar, chunk, slot)

        for part in range(q_smem.shape[0]):
            src = qp_ref.at[part, head, pl.ds(row0, m_rows)]
            plgpu.copy_gmem_to_smem(src, q_smem.at[part], q_bar)

        @pl.when(steps > 0)
        def _():
            issue_kv(c_begin, 0)

        plgpu.barrier_wait(q_bar)

        wgmma = plgpu.Layout.WGMMA
        # Positions as one vector per row and per column (2 + 1 registers a thread), broadcast
        # at the compare, instead of three live [64, block_kv] int tiles (96 registers).
        row_ids = lay(lax.broadcasted_iota(jnp.int32, (m_rows,), 0), wgmma.reduce(1))
        col_ids = lay(lax.broadcasted_iota(jnp.int32, (block_kv,), 0), wgmma.reduce(0))
        # Rows past the tile's last token (other requests' or padding rows) reuse the last
        # token's position, so every row stays finite; the epilogue never reads them.
        row_pos = jnp.minimum(pos_base + (row0 + row_ids) // group, pos_last)

        def body(i, carry):
            acc, m_i, l_i = carry
            chunk = c_begin + i
            more = i + 1 < steps
            if split_f32:
                # One f32 landing slot per K and V: it is emptied into the bf16 hi/lo operand
                # buffers at once, and the next step's TMA into it overlaps this step's math.
                slot = 0
            else:
                slot = lax.rem(i, 2)

                @pl.when(more)
                def _():
                    issue_kv(chunk + 1, 1 - slot)

            plgpu.barrier_wait(k_bar.at[slot])

            if split_f32:
                k_hi, k_lo = _hi_lo(lay(k_smem.at[slot][...], wgmma))
                kx_smem.at[0][...] = k_hi
                kx_smem.at[1][...] = k_lo
                plgpu.commit_smem()
                pl.when(more)(lambda: issue(k_ref, k_smem, k_bar, chunk + 1, 0))
                qh, ql, kh, kl = q_smem.at[0], q_smem.at[1], kx_smem.at[0], kx_smem.at[1]
                s = mma(None, [(qh, kh), (qh, kl), (ql, kh)], transpose_b=True)
            else:
                s = mma(None, [(q_smem.at[0], k_smem.at[slot])], transpose_b=True)
            s = s * sm_scale
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            tile_shape = (m_rows, block_kv)
            key_pos = lax.broadcast_in_dim(chunk * block_kv + col_ids, tile_shape, [1])
            q_pos = lax.broadcast_in_dim(row_pos, tile_shape, [0])
            mask = key_pos <= q_pos
            if sliding_window is not None:
                mask = mask & (key_pos > q_pos - sliding_window)
            s = jnp.where(mask, s * _LOG2E, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

            plgpu.barrier_wait(v_bar.at[slot])

            # The request's last page may hold unwritten slots (garbage, even NaN): P is 0
            # there, but 0 * NaN is NaN, so zero those V rows before the MMA reads them.
            def clean_v():
                v_rows = iota((block_kv, head_dim), 0)
                v_tile = lay(v_smem.at[slot][...], wgmma)
                keep = chunk * block_kv + v_rows < kv_len
                return jnp.where(keep, v_tile, jnp.zeros_like(v_tile))

            if split_f32:  # the f32 tile passes through registers anyway: always clean it
                v_hi, v_lo = _hi_lo(clean_v())
                vx_smem.at[0][...] = v_hi
                vx_smem.at[1][...] = v_lo
                plgpu.commit_smem()
                pl.when(more)(lambda: issue(v_ref, v_smem, v_bar, chunk + 1, 0))
                p_hi, p_lo = _hi_lo(p)
                vh, vl = vx_smem.at[0], vx_smem.at[1]
                pairs = [(p_hi, vh), (p_hi, vl), (p_lo, vh)]
            else:

                @pl.when(chunk * block_kv + block_kv > kv_len)
                def _():
                    v_smem.at[slot][...] = clean_v()
                    plgpu.commit_smem()

                pairs = [(p.astype(v_smem.dtype), v_smem.at[slot])]
            acc = mma(acc, pairs, transpose_b=False)
            return acc, m_new, l_i

        acc0 = lay(jnp.zeros((m_rows, head_dim), jnp.float32), wgmma)
        m0 = lay(jnp.full((m_rows,), _M_INIT, jnp.float32), wgmma.reduce(1))
        l0 = lay(jnp.zeros((m_rows,), jnp.float32), wgmma.reduce(1))
        acc, m_i, l_i = lax.fori_loop(0, steps, body, (acc0, m0, l0))

        has_keys = l_i > 0
        inv_l = jnp.where(has_keys, 1.0 / jnp.where(has_keys, l_i, 1.0), 0.0)
        o_smem[...] = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
        lse_smem[...] = jnp.where(has_keys, m_i + jnp.log2(jnp.where(has_keys, l_i, 1.0)), -jnp.inf)
        plgpu.commit_smem()
        # Write back only the 8-row groups that hold real rows: a decode tile of a 4:1 GQA
        # model has 4 real rows of 64, and its full f32 tile would cost as much HBM traffic
        # as reading 64 keys of its context.
        real_rows = q_end * group - row0
        for g in range(m_rows // 8):
            rows = pl.ds(g * 8, 8)

            @pl.when(g * 8 < real_rows)
            def _(rows=rows):  # pl.when traces the body now; the default only quiets B023
                plgpu.copy_smem_to_gmem(o_smem.at[rows], o_ref.at[split, tile, head, rows])

        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[split, tile, head])
        plgpu.wait_smem_to_gmem(0)


def _hi_lo(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """f32 -> (hi, lo) bf16 with hi + lo == x to ~2^-16 relative (bf16x3 products)."""
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


# Dynamic shared memory one CUDA block may use on H100 (227 KiB).
_SMEM_LIMIT = 227 * 1024


def smem_bytes(dtype, head_dim: int, block_kv: int) -> int:
    """Shared memory of one block: Q, the K/V landing slots (2 each; f32: 1 each plus bf16
    hi/lo operand buffers), O and lse."""
    item = jnp.dtype(dtype).itemsize
    f32 = jnp.dtype(dtype) == jnp.dtype(jnp.float32)
    q = (2 if f32 else 1) * ROWS_PER_TILE * head_dim * 2
    kv = 2 * (1 if f32 else 2) * block_kv * head_dim * item
    kv_ops = 2 * 2 * block_kv * head_dim * 2 if f32 else 0
    return q + kv + kv_ops + ROWS_PER_TILE * head_dim * 4 + ROWS_PER_TILE * 4


def config_error(
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype,
    *,
    block_kv: int | None = None,
) -> str | None:
    """Why this kernel cannot serve a model/cache configuration, or None if it can.

    For the engine's backend choice: a configuration this rejects must stay on `xla`.
    """
    if block_kv is None:
        block_kv = max(64, block_size)
    if num_q_heads % num_kv_heads:
        return f"num_q_heads={num_q_heads} must be a multiple of num_kv_heads={num_kv_heads}"
    if num_q_heads // num_kv_heads > ROWS_PER_TILE:
        return f"GQA group {num_q_heads // num_kv_heads} exceeds ROWS_PER_TILE={ROWS_PER_TILE}"
    if jnp.dtype(dtype) not in map(jnp.dtype, (jnp.bfloat16, jnp.float16, jnp.float32)):
        return f"dtype {jnp.dtype(dtype)} unsupported; use bfloat16, float16 or float32"
    if head_dim % 64:
        # 64 bf16 = one 128-byte swizzle row, the unit of TMA boxes and WGMMA operands.
        return f"head_dim={head_dim} must be a multiple of 64"
    if block_size % 8:
        return f"block_size={block_size} must be a multiple of 8 (TMA row tiles)"
    if block_kv % block_size or block_kv % 64:
        # 64: the row count of the WGMMA register layout the V tile is cleaned in.
        return f"block_kv={block_kv} must be a multiple of 64 and of block_size={block_size}"
    if (need := smem_bytes(dtype, head_dim, block_kv)) > _SMEM_LIMIT:
        return (
            f"block_kv={block_kv} with head_dim={head_dim} and {jnp.dtype(dtype)} needs {need} "
            f"bytes of shared memory > {_SMEM_LIMIT}; use a smaller block_kv "
            f"(block_size={block_size})"
        )
    return None


def _validate(q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, num_seqs, block_kv):
    if q.ndim != 3 or k_cache.ndim != 4:
        raise ValueError(
            f"expected q [T, Hq, D] and k_cache [num_blocks, block_size, Hkv, D], got "
            f"q.shape={q.shape}, k_cache.shape={k_cache.shape}"
        )
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache.shape={k_cache.shape} != v_cache.shape={v_cache.shape}")
    _, hq, d = q.shape
    _, bs, hkv, dk = k_cache.shape
    if dk != d:
        raise ValueError(f"head_dim mismatch: q {d} vs k_cache {dk}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"dtypes differ: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    if error := config_error(hq, hkv, d, bs, q.dtype, block_kv=block_kv):
        raise ValueError(error)
    r = kv_lens.shape[0]
    if block_tables.ndim != 2 or block_tables.shape[0] != r:
        raise ValueError(f"block_tables.shape={block_tables.shape} must be [R={r}, B]")
    if cu_q_lens.shape != (r + 1,):
        raise ValueError(f"cu_q_lens.shape={cu_q_lens.shape} must be (R + 1,) = ({r + 1},)")
    if num_seqs.shape != (1,):
        raise ValueError(f"num_seqs.shape={num_seqs.shape} must be (1,)")


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "sliding_window",
        "soft_cap",
        "interpret",
        "block_kv",
        "num_kv_splits",
    ),
)
def ragged_paged_attention_gpu(
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
    interpret: bool | object = False,  # True or an InterpretGPUParams: run the GPU interpreter
    block_kv: int | None = None,  # keys per pipeline step; None: max(64, block_size)
    num_kv_splits: int | None = None,  # split-K factor; None: from static shapes
) -> jax.Array:  # [T, Hq, D]; rows of padding tokens are 0
    """Causal ragged paged attention over a mixed prefill/decode batch (Mosaic GPU)."""
    if block_kv is None:
        block_kv = max(64, k_cache.shape[1]) if k_cache.ndim == 4 else 64
    _validate(q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, num_seqs, block_kv)
    t, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    r, b = block_tables.shape
    group = hq // hkv
    m_rows = ROWS_PER_TILE
    max_tiles = -(-(t * group) // m_rows) + r
    if num_kv_splits is not None and num_kv_splits < 1:
        raise ValueError(f"num_kv_splits={num_kv_splits} must be >= 1")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window} must be >= 1 (or None)")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap={soft_cap} must be > 0 (or None)")
    splits = num_kv_splits or default_num_kv_splits(max_tiles, hkv, b * bs)

    tile_req, tile_row0, tile_start = _work_list(kv_lens, cu_q_lens, num_seqs, group, max_tiles)
    # GQA packing: [T, Hkv, G, D] -> [Hkv, T * G, D], padded so any tile's rows are in bounds.
    qp = q.reshape(t, hkv, group, d).transpose(1, 0, 2, 3).reshape(hkv, t * group, d)
    qp = jnp.pad(qp, ((0, 0), (0, m_rows), (0, 0)))
    # float32 runs as bf16x3 on the tensor cores: x = hi + lo in bf16, x.y ~ hi.hi' + hi.lo' +
    # lo.hi' (f32 accumulation), ~1e-5 relative; WGMMA's own f32 mode is tf32 (1e-3) and cannot
    # take V as a row-major B operand.
    split_f32 = q.dtype == jnp.float32
    mma_dtype = jnp.bfloat16 if split_f32 else q.dtype
    if split_f32:
        qp = jnp.stack(_hi_lo(qp))
    else:
        qp = qp[None]

    transforms = _smem_transforms(q.dtype, d)
    mma_transforms = _smem_transforms(mma_dtype, d)
    slots = 1 if split_f32 else 2
    kv_scratch = (
        plgpu.SMEM((slots, block_kv, d), q.dtype, transforms=transforms),
        plgpu.SMEM((slots, block_kv, d), q.dtype, transforms=transforms),
    )
    if split_f32:
        kv_scratch += (
            plgpu.SMEM((2, block_kv, d), mma_dtype, transforms=mma_transforms),
            plgpu.SMEM((2, block_kv, d), mma_dtype, transforms=mma_transforms),
        )
    kernel = functools.partial(
        _kernel,
        group=group,
        block_size=bs,
        block_kv=block_kv,
        num_splits=splits,
        sm_scale=float(sm_scale),
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        interpret=bool(interpret),
        split_f32=split_f32,
    )
    o_part, lse_part = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((splits, max_tiles, hkv, m_rows, d), jnp.float32),
            jax.ShapeDtypeStruct((splits, max_tiles, hkv, m_rows), jnp.float32),
        ),
        scratch_types=(
            plgpu.SMEM(qp.shape[:1] + (m_rows, d), mma_dtype, transforms=mma_transforms),
            *kv_scratch,
            plgpu.SMEM((m_rows, d), jnp.float32),
            plgpu.SMEM((m_rows,), jnp.float32),
            plgpu.Barrier(num_arrivals=qp.shape[0]),
            plgpu.Barrier(num_arrivals=block_kv // bs, num_barriers=slots),
            plgpu.Barrier(num_arrivals=block_kv // bs, num_barriers=slots),
        ),
        grid=(max_tiles, hkv, splits),
        grid_names=("tile", "head", "split"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=(gpu_interpret_params() if interpret is True else interpret) or False,
    )(qp, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, tile_req, tile_row0)

    return _combine(o_part, lse_part, cu_q_lens, num_seqs, tile_start, t, group, q.dtype)


def _combine(o_part, lse_part, cu_q_lens, num_seqs, tile_start, t, group, dtype):
    """Merge the kv splits (log-sum-exp weights) and put tile rows back as [T, Hq, D]."""
    splits, max_tiles, hkv, m_rows, d = o_part.shape
    r = tile_start.shape[0]
    tok = jnp.arange(t, dtype=jnp.int32)
    req = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], tok, side="right").astype(jnp.int32), r - 1)
    valid = tok < cu_q_lens[num_seqs[0]]
    local = (tok - cu_q_lens[req])[:, None] * group + jnp.arange(group, dtype=jnp.int32)
    tile = tile_start[req][:, None] + local // m_rows  # [T, G]
    row = local % m_rows
    flat = (tile[:, None, :] * hkv + jnp.arange(hkv, dtype=jnp.int32)[None, :, None]) * m_rows
    flat = jnp.where(valid[:, None, None], flat + row[:, None, :], 0)  # [T, Hkv, G]
    o = jnp.take(o_part.reshape(splits, -1, d), flat.reshape(-1), axis=1)  # [S, T*Hq, D]
    lse = jnp.take(lse_part.reshape(splits, -1), flat.reshape(-1), axis=1)  # [S, T*Hq]
    lse_max = jnp.max(lse, axis=0)
    lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    w = jnp.exp2(lse - lse_max)  # 0 for empty splits (lse = -inf)
    out = jnp.sum(w[..., None] * o, axis=0) / jnp.sum(w, axis=0)[:, None]
    out = jnp.where(valid[:, None, None], out.reshape(t, hkv * group, d), 0.0)
    return out.astype(dtype)
