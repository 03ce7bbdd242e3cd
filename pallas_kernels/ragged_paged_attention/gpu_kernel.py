"""The Mosaic GPU kernel body of ragged paged attention: what one CUDA block runs.

A block owns (tile, kv_head, kv_split) of the grid gpu.py launches: it TMA-copies its tile's
64 GQA-packed query rows once, streams its share of the request's KV pages (one TMA per page,
gathered through the block table) into double-buffered shared memory, runs S = Q K^T and
O += P V on the tensor cores (WGMMA) with an online softmax in base 2, and writes the f32
partial O / l and its log2-sum-exp for gpu.py's split-K combine. Work planning, validation,
launch and the combine are in gpu.py; pallas_kernels/NOTES.md (CUDA section) has the design.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# Query rows per tile: one warpgroup's WGMMA M dimension on Hopper.
ROWS_PER_TILE = 64
_LOG2E = math.log2(math.e)
# Finite "minus infinity" for the running max: exp2(-inf - m) stays 0 and a row that has
# seen no key yet keeps alpha = exp2(m - m) = 1 instead of NaN.
_M_INIT = -1e30


def smem_transforms(dtype, head_dim: int) -> tuple:
    """128-byte swizzle over (8, 128 bytes) tiles: what TMA and WGMMA both read fast."""
    elems = 128 // jnp.dtype(dtype).itemsize
    if head_dim % elems:
        raise ValueError(f"head_dim={head_dim} must be a multiple of {elems} for {dtype}")
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(128))


def attention_kernel(
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
                k_hi, k_lo = hi_lo(lay(k_smem.at[slot][...], wgmma))
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
                v_hi, v_lo = hi_lo(clean_v())
                vx_smem.at[0][...] = v_hi
                vx_smem.at[1][...] = v_lo
                plgpu.commit_smem()
                pl.when(more)(lambda: issue(v_ref, v_smem, v_bar, chunk + 1, 0))
                p_hi, p_lo = hi_lo(p)
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


def hi_lo(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """f32 -> (hi, lo) bf16 with hi + lo == x to ~2^-16 relative (bf16x3 products)."""
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)
