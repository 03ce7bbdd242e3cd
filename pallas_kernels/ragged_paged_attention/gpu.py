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

This module is the host side: what configurations the kernel takes (`config_error`), the work
list and split-K factor, the launch (grid, shared memory) and the combine. The per-block
kernel body is gpu_kernel.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.ragged_paged_attention.gpu_kernel import (
    ROWS_PER_TILE,
    attention_kernel,
    hi_lo,
    smem_transforms,
)
from pallas_kernels.ragged_paged_attention.validation import validate

# SMs on an H100 SXM; the split-K heuristic aims to give each of them a block.
_H100_SMS = 132
# Below this many keys per split a split costs more (partials, combine) than it saves.
_MIN_KEYS_PER_SPLIT = 512


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
    # Shapes, dtypes, metadata and options: the checks every kernel's public entry makes.
    args = (q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, num_seqs)
    options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    validate(*args, **options, platform="cuda")
    t, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    if block_kv is None:
        block_kv = max(64, bs)
    if error := config_error(hq, hkv, d, bs, q.dtype, block_kv=block_kv):
        raise ValueError(error)
    if num_kv_splits is not None and num_kv_splits < 1:
        raise ValueError(f"num_kv_splits={num_kv_splits} must be >= 1")
    r, b = block_tables.shape
    group = hq // hkv
    m_rows = ROWS_PER_TILE
    max_tiles = -(-(t * group) // m_rows) + r
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
        qp = jnp.stack(hi_lo(qp))
    else:
        qp = qp[None]

    transforms = smem_transforms(q.dtype, d)
    mma_transforms = smem_transforms(mma_dtype, d)
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
        attention_kernel,
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
