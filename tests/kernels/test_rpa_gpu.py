"""The Mosaic GPU ragged paged attention kernel, run by the GPU interpreter on the CPU, against
the pure-jnp reference.

The interpreter (jax's InterpretGPUParams) simulates the kernel's TMA copies, barriers and
shared memory per CUDA block, so the paging, pipelining, masking, split-K and combine logic
all run here; only the two MMAs go through lax.dot_general (see gpu.py `mma`).

Every case poisons the kernel's input with NaN wherever a correct kernel must not look:
cache blocks no request uses, slots of a request's last page past its kv_len, block-table
entries past a request's pages (they point at an all-NaN block), and padding query rows.
The reference gets the clean arrays (its masking is by -inf scores, see reference.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention.gpu import ragged_paged_attention_gpu
from pallas_kernels.ragged_paged_attention.reference import (
    ref_ragged_paged_attention,
)

# Allowed |kernel - reference| per dtype: atol + rtol * |reference|. Measured over every case
# below (|reference| up to 3.7): bf16 max abs error 1.56e-2 = one bf16 ulp at |out| in [2, 4)
# (the output is rounded to bf16 and P enters the PV MMA as bf16; worst relative 2.4e-2 on a
# 0.1-sized output); f16 max abs error 9.8e-4, half an f16 ulp at [2, 4). The bounds sit
# above that by ~2x; a masking bug (one key too many or too few) moves outputs by >= 5e-2.
TOLERANCE = {
    jnp.dtype(jnp.bfloat16): dict(atol=2e-2, rtol=2e-2),
    jnp.dtype(jnp.float16): dict(atol=2e-3, rtol=2e-3),
    jnp.dtype(jnp.float32): dict(atol=1e-4, rtol=1e-4),
}


# Jitted once per shape: eager op-by-op dispatch of the reference costs more than compiling it.
_jit_ref = jax.jit(
    ref_ragged_paged_attention, static_argnames=("sm_scale", "sliding_window", "soft_cap")
)


@dataclasses.dataclass
class Case:
    kernel_args: tuple  # poisoned inputs for the kernel
    ref_args: tuple  # the same inputs, clean, for the reference


def make_case(
    q_lens: list[int],
    kv_lens: list[int],
    *,
    num_q_heads: int = 2,
    num_kv_heads: int = 1,
    head_dim: int = 64,
    block_size: int = 16,
    dtype=jnp.bfloat16,
    num_tokens: int | None = None,
    num_rows: int | None = None,
    max_blocks: int | None = None,
    num_blocks: int | None = None,
    seed: int = 0,
) -> Case:
    """A ragged batch with its pages scattered over the cache and NaN everywhere unused.

    num_tokens / num_rows / max_blocks / num_blocks fix the padded shapes (T, R, B and the
    cache size) so cases of one family share one compiled kernel; by default they leave 3
    padding tokens, 1 padding request row, 1 unused table entry per request and 4 spare
    blocks.
    """
    assert all(0 <= q <= kv for q, kv in zip(q_lens, kv_lens, strict=True))
    rng = np.random.default_rng(seed)
    n = len(q_lens)
    r = num_rows or n + 1
    pad_requests = r - n
    pages = [-(-kv // block_size) for kv in kv_lens]
    b = max_blocks or max(pages) + 1
    # Spare blocks no request uses; the last one is the poison every unused entry points at.
    num_blocks = num_blocks or sum(pages) + 4
    assert n <= r and max(pages) <= b and sum(pages) < num_blocks
    poison = num_blocks - 1
    order = rng.permutation(num_blocks - 1)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = np.zeros(shape, np.float32)
    v = np.zeros(shape, np.float32)
    k_bad = np.full(shape, np.nan, np.float32)
    v_bad = np.full(shape, np.nan, np.float32)
    bt = np.zeros((r, b), np.int32)
    bt_bad = np.full((r, b), poison, np.int32)
    used = 0
    for i, kv in enumerate(kv_lens):
        for p in range(pages[i]):
            blk = int(order[used])
            used += 1
            bt[i, p] = bt_bad[i, p] = blk
            n_slots = min(block_size, kv - p * block_size)
            for arr, bad in ((k, k_bad), (v, v_bad)):
                vals = rng.standard_normal((n_slots, num_kv_heads, head_dim))
                arr[blk, :n_slots] = bad[blk, :n_slots] = vals
    t = num_tokens or sum(q_lens) + 3
    assert t >= sum(q_lens)
    q = rng.standard_normal((t, num_q_heads, head_dim)).astype(np.float32)
    q_bad = q.copy()
    q[sum(q_lens) :] = 0.0
    q_bad[sum(q_lens) :] = np.nan
    cu = np.concatenate([[0], np.cumsum(q_lens), [sum(q_lens)] * pad_requests]).astype(np.int32)
    lens = np.array(list(kv_lens) + [0] * pad_requests, np.int32)
    meta = (jnp.asarray(lens), None, jnp.asarray(cu), jnp.asarray([n], jnp.int32))

    def pack(qq, kk, vv, tables):
        return (
            jnp.asarray(qq, dtype),
            jnp.asarray(kk, dtype),
            jnp.asarray(vv, dtype),
            meta[0],
            jnp.asarray(tables),
            meta[2],
            meta[3],
        )

    return Case(pack(q_bad, k_bad, v_bad, bt_bad), pack(q, k, v, bt))


def check(case: Case, *, sm_scale: float = 0.125, **kwargs) -> float:
    """Run kernel (interpret) and reference; assert closeness; return the max abs error."""
    attn = {k: kwargs.pop(k) for k in ("sliding_window", "soft_cap") if k in kwargs}
    out = ragged_paged_attention_gpu(
        *case.kernel_args, sm_scale=sm_scale, interpret=True, **attn, **kwargs
    )
    ref = _jit_ref(*case.ref_args, sm_scale=sm_scale, **attn)
    out = np.asarray(out.astype(jnp.float32))
    ref = np.asarray(ref.astype(jnp.float32))
    assert np.isfinite(out).all(), "NaN/inf in the output: the kernel read poisoned memory"
    tol = TOLERANCE[case.kernel_args[0].dtype]
    np.testing.assert_allclose(out, ref, **tol)
    return float(np.abs(out - ref).max())


# --- batch shapes (one padded shape: T=40, R=8, B=8, 64 blocks; one compile) --------------

BATCH = dict(num_tokens=40, num_rows=8, max_blocks=8, num_blocks=64)


def test_decode_only():
    check(make_case([1, 1, 1, 1], [1, 9, 40, 77], **BATCH))


def test_prefill_only():
    check(make_case([13, 22], [13, 22], **BATCH))


def test_mixed_batch_with_empty_request_and_prefix():
    # A chunked prefill with earlier context, two decodes, a request with no query tokens this
    # step (between two real ones) and a fresh prefill, plus padding tokens and request rows.
    check(make_case([20, 1, 0, 1, 13], [52, 30, 17, 5, 13], **BATCH))


def test_block_boundaries():
    # Contexts one short of, at, and one past a page edge and a 64-key step edge.
    check(make_case([1, 2, 1, 3, 1, 2], [15, 16, 17, 63, 64, 65], **BATCH))


@pytest.mark.parametrize("block_size", [32, 8])
def test_block_boundaries_other_block_sizes(block_size):
    # 32: two pages per 64-key step; 8: eight TMAs arriving on one barrier per step.
    kv = [block_size - 1, block_size, block_size + 1, 63, 64, 65]
    check(make_case([1, 2, 1, 3, 1, 1], kv, block_size=block_size))


@pytest.mark.parametrize(("num_kv_splits", "sliding_window"), [(4, None), (3, 300)])
def test_long_context_split_k(num_kv_splits, sliding_window):
    # A long context cut into kv splits merged by the combine step, next to a short request
    # whose extra splits are empty and must weigh nothing; with a window, the splits divide
    # only the window's steps (keys 699..999 here, not 0..999). sm_scale=1 makes the
    # softmax peaky, so the splits' log-sum-exps differ by far and a wrong merge weight shows.
    case = make_case([2, 1], [1000, 3], num_q_heads=4, num_kv_heads=1)
    check(case, num_kv_splits=num_kv_splits, sm_scale=1.0, sliding_window=sliding_window)


def test_default_splits_split_a_small_batch_with_long_contexts():
    from pallas_kernels.ragged_paged_attention.gpu import default_num_kv_splits

    assert default_num_kv_splits(2, 1, 4096) == 8  # 2 blocks, 4096 keys: split
    assert default_num_kv_splits(200, 8, 4096) == 1  # the SMs are already full
    assert default_num_kv_splits(2, 1, 256) == 1  # too short to pay for a combine


# --- heads, dims, dtypes, attention variants (combined: each combination is one compile) ------


def test_gqa_1_head_dim_128_float16():
    check(
        make_case(
            [5, 1, 12], [40, 19, 12], num_q_heads=2, num_kv_heads=2, head_dim=128, dtype=jnp.float16
        )
    )


def test_gqa_3_head_dim_64_soft_cap():
    case = make_case([5, 1, 12], [40, 19, 12], num_q_heads=3, num_kv_heads=1, head_dim=64)
    check(case, soft_cap=5.0, sm_scale=0.5)


def test_float32_bf16x3_gqa_4_mixed_sliding_window():
    # f32 runs as three bf16 MMAs per product (hi/lo split); it must stay near f32 accuracy.
    case = make_case(
        [9, 1, 0, 1, 14],
        [80, 33, 5, 64, 14],
        num_q_heads=8,
        num_kv_heads=2,
        head_dim=64,
        dtype=jnp.float32,
    )
    check(case, sliding_window=50)


def test_gqa_8_head_dim_128_sliding_window():
    # The window drops whole 64-key steps for the long request and cuts inside a step too.
    case = make_case([6, 1, 30], [150, 90, 30], num_q_heads=16, num_kv_heads=2, head_dim=128)
    check(case, sliding_window=40)


# --- pipeline synchronization -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pipeline_has_no_data_races(dtype):
    # The interpreter's happens-before race detector tracks every TMA, barrier and SMEM access:
    # a TMA refilling a slot the math still reads, or a read before its barrier, is a race.
    # (It catches both: issuing the f32 K refill before the tile is converted, and refilling
    # the bf16 slot in use, were tried and flagged.) bf16 runs the 2-slot ring, f32 the
    # 1-slot landing buffers; 2 kv splits so several blocks run.
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    case = make_case([20, 1, 0, 1, 13], [152, 30, 17, 5, 13], dtype=dtype)
    params = InterpretGPUParams(detect_races=True)
    out = ragged_paged_attention_gpu(
        *case.kernel_args, sm_scale=0.125, interpret=params, num_kv_splits=2
    )
    out.block_until_ready()
    assert not get_races().races_found
    ref = _jit_ref(*case.ref_args, sm_scale=0.125)
    np.testing.assert_allclose(
        np.asarray(out.astype(jnp.float32)),
        np.asarray(ref.astype(jnp.float32)),
        **TOLERANCE[jnp.dtype(dtype)],
    )


# --- the test can fail ------------------------------------------------------------------------


def test_poison_is_visible_to_a_stray_read():
    # Sanity of the harness: the poisoned cache reaches the output if a kernel reads it. A
    # "kernel" that attends over whole pages (ignoring kv_len) must produce NaN here.
    case = make_case([1], [5], **BATCH)
    q, k, v, lens, bt, cu, ns = case.kernel_args
    full_pages = jnp.full_like(lens, k.shape[1])
    out = _jit_ref(q, k, v, full_pages, bt, cu, ns, sm_scale=0.125)
    assert not np.isfinite(np.asarray(out[:1].astype(jnp.float32))).all()


# --- input validation -------------------------------------------------------------------------


def test_rejects_bad_shapes_and_dtypes_with_their_values():
    case = make_case([1], [5])
    q, k, v, lens, bt, cu, ns = case.kernel_args
    with pytest.raises(ValueError, match="num_q_heads=3 must be a multiple of num_kv_heads=2"):
        ragged_paged_attention_gpu(
            jnp.zeros((2, 3, 64), q.dtype),
            jnp.zeros((4, 16, 2, 64), q.dtype),
            jnp.zeros((4, 16, 2, 64), q.dtype),
            lens,
            bt,
            cu,
            ns,
            sm_scale=1.0,
        )
    with pytest.raises(ValueError, match="dtype int8 unsupported"):
        ragged_paged_attention_gpu(
            q.astype(jnp.int8),
            k.astype(jnp.int8),
            v.astype(jnp.int8),
            lens,
            bt,
            cu,
            ns,
            sm_scale=1.0,
        )
    with pytest.raises(ValueError, match="block_kv=128 with head_dim=128 and float32 needs"):
        f32 = jnp.zeros((4, 16, 1, 128), jnp.float32)
        ragged_paged_attention_gpu(
            jnp.zeros((2, 2, 128), jnp.float32),
            f32,
            f32,
            lens,
            bt,
            cu,
            ns,
            sm_scale=1.0,
            block_kv=128,
        )
    with pytest.raises(ValueError, match=r"cu_q_lens.shape=\(5,\)"):
        ragged_paged_attention_gpu(q, k, v, lens, bt, jnp.zeros((5,), jnp.int32), ns, sm_scale=1.0)
    with pytest.raises(ValueError, match="block_kv=48"):
        ragged_paged_attention_gpu(q, k, v, lens, bt, cu, ns, sm_scale=1.0, block_kv=48)


def test_config_error_names_what_the_engine_must_keep_on_xla():
    from pallas_kernels.ragged_paged_attention.gpu import config_error

    assert config_error(32, 8, 128, 16, jnp.bfloat16) is None
    assert config_error(32, 8, 64, 32, jnp.float32) is None
    assert "head_dim=16 must be a multiple of 64" in config_error(4, 2, 16, 16, jnp.float32)
    assert "needs" in config_error(32, 8, 128, 128, jnp.float32)  # f32 with 128-slot pages
    assert "block_size=4" in config_error(32, 8, 128, 4, jnp.bfloat16)


def test_rejects_bad_knobs_with_their_values():
    q, k, v, lens, bt, cu, ns = make_case([1], [5]).kernel_args
    for kwargs, message in [
        (dict(num_kv_splits=0), "num_kv_splits=0"),
        (dict(sliding_window=0), "sliding_window=0"),
        (dict(soft_cap=-1.0), "soft_cap=-1.0"),
    ]:
        with pytest.raises(ValueError, match=message):
            ragged_paged_attention_gpu(q, k, v, lens, bt, cu, ns, sm_scale=1.0, **kwargs)
