"""Random ragged paged-attention batches for kernel tests (shared by every backend's tests).

`make_inputs(case)` returns the kernel's inputs twice: `poisoned`, where everything a correct
kernel must not read is NaN (the null block 0, blocks no request owns, slots past a request's
length in its last block, query rows of padding tokens), and `clean`, the same batch with
finite values there, for the reference (whose masked 0 * NaN would otherwise poison it too).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention.api import config_error, kernel_platform
from pallas_kernels.ragged_paged_attention.reference import ref_ragged_paged_attention

# How the kernel tests run the kernels. "interpret" (unset: CI on CPU): each in its Pallas
# interpreter, race detectors included. "compiled" (scripts/device_check.py, on a GPU or TPU):
# the kernel of this device's platform runs compiled for real, with the same cases and
# tolerances; the other platform's kernel module and the interpreter-only checks skip.
KERNEL_TESTS = os.environ.get("JAXSERVE_KERNEL_TESTS", "interpret")
if KERNEL_TESTS not in ("interpret", "compiled"):
    raise ValueError(f"JAXSERVE_KERNEL_TESTS must be interpret|compiled, got {KERNEL_TESTS!r}")
COMPILED = KERNEL_TESTS == "compiled"
if COMPILED and jax.default_backend() not in ("gpu", "cuda", "tpu"):
    raise ValueError(
        f"JAXSERVE_KERNEL_TESTS=compiled needs a GPU or TPU; jax's backend is "
        f"{jax.default_backend()!r}"
    )
# the `interpret` argument every kernel call in the tests passes
INTERPRET = not COMPILED


def kernel_module_for(platform: str) -> pytest.MarkDecorator:
    """A module's pytestmark: compiled, only the kernel of this device's platform can run."""
    here = kernel_platform(jax.default_backend())
    return pytest.mark.skipif(
        COMPILED and here != platform,
        reason=f"the {platform} kernel cannot run compiled on a {here} device",
    )


# Marks what only the interpreter (or only a CPU) can check: race detectors, CPU-only errors.
interpreter_only = pytest.mark.skipif(COMPILED, reason="an interpreter-only check")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # test id
    q_lens: tuple[int, ...]  # query tokens of each real request this step
    kv_lens: tuple[int, ...]  # KV tokens of each real request after this step (>= q_len)
    num_q_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 128
    block_size: int = 16
    dtype: str = "float32"
    sliding_window: int | None = None
    soft_cap: float | None = None
    sm_scale: float | None = None  # None: head_dim ** -0.5 (1.0 makes the softmax peaky)
    pad_tokens: int = 3  # padding tokens after the last real one (their rows must come out 0)
    pad_rows: int = 1  # request rows past num_seqs (q_len 0, kv_len 0, null block table)
    extra_pages: int = 1  # unused block-table columns beyond the longest request
    spare_blocks: int = 3  # blocks no request owns (poisoned)
    seed: int = 0
    # Padded (T, R, B, num_blocks) to use instead of the pad_* fields' (see `pad_alike`).
    shape: tuple[int, int, int, int] | None = None

    def natural_shape(self) -> tuple[int, int, int, int]:  # (T, R, B, num_blocks) from pad_*
        pages = [-(-k // self.block_size) for k in self.kv_lens]
        return (
            sum(self.q_lens) + self.pad_tokens,
            len(self.q_lens) + self.pad_rows,
            max(pages, default=0) + self.extra_pages,
            1 + sum(pages) + self.spare_blocks,  # block 0 is the null block
        )


def pad_alike(cases: Sequence[Case]) -> list[Case]:
    """The cases padded to one common shape (the largest of each dim), so that cases with the
    same heads, dtype and options share one compiled kernel (interpret mode compiles are the
    tests' main cost). More padding only adds poisoned rows, blocks and table entries."""
    shape = tuple(max(dims) for dims in zip(*(c.natural_shape() for c in cases), strict=True))
    return [dataclasses.replace(c, shape=shape) for c in cases]


# (atol, rtol) of each kernel vs the float32-math reference, per input dtype (measured).
# TPU float32: both sum the same terms in another order (max error ~1e-6 at these sizes).
# bfloat16 (both): the output is rounded to bf16 (2^-8 relative) and P enters the PV matmul in
# bf16; the CUDA kernel's max abs error is 1.56e-2 = one bf16 ulp at |out| in [2, 4) (worst
# relative 2.4e-2 on a 0.1-sized output). CUDA float16: max abs error 9.8e-4, half an f16 ulp
# at [2, 4). CUDA float32 runs as bf16x3 on the tensor cores (WGMMA has no f32 mode): max abs
# error 3.0e-5. A masking bug (one key too many or too few) moves outputs by >= 5e-2.
TOLERANCES = {
    "tpu": {"float32": (2e-5, 2e-5), "bfloat16": (2e-2, 2e-2)},
    "cuda": {"float32": (1e-4, 1e-4), "bfloat16": (2e-2, 2e-2), "float16": (2e-3, 2e-3)},
}


def make_inputs(case: Case) -> tuple[dict, dict]:  # (poisoned, clean) kernel keyword inputs
    assert len(case.q_lens) == len(case.kv_lens)
    assert all(0 <= q <= k for q, k in zip(case.q_lens, case.kv_lens, strict=True))
    rng = np.random.default_rng(case.seed)
    bs, hkv, d = case.block_size, case.num_kv_heads, case.head_dim
    n = len(case.q_lens)
    pages = [-(-k // bs) for k in case.kv_lens]
    t, r, b, num_blocks = case.shape or case.natural_shape()
    total = sum(case.q_lens)
    assert t >= total and r >= n and b >= max(pages, default=0) and num_blocks > sum(pages)
    # Owned blocks are scattered over the pool in random order (not contiguous per request).
    ids = rng.permutation(np.arange(1, num_blocks))
    tables = np.zeros((r, b), np.int32)
    owned = np.zeros((num_blocks, bs), bool)  # slots holding real keys
    start = 0
    for i, (k, np_) in enumerate(zip(case.kv_lens, pages, strict=True)):
        tables[i, :np_] = ids[start : start + np_]
        start += np_
        for j in range(k):
            owned[tables[i, j // bs], j % bs] = True
    cu = np.zeros(r + 1, np.int32)
    cu[1 : n + 1] = np.cumsum(case.q_lens)
    cu[n + 1 :] = total
    kv_lens = np.zeros(r, np.int32)
    kv_lens[:n] = case.kv_lens

    q = rng.standard_normal((t, case.num_q_heads, d), np.float32)
    k = rng.standard_normal((num_blocks, bs, hkv, d), np.float32)
    v = rng.standard_normal((num_blocks, bs, hkv, d), np.float32)
    clean = _pack(case, q, k, v, kv_lens, tables, cu, n)
    # Fresh copies: on CPU jnp.asarray may alias the numpy buffer, so poisoning q/k/v in place
    # would poison `clean` too.
    q, k, v = q.copy(), k.copy(), v.copy()
    q[total:] = np.nan
    k[~owned] = np.nan
    v[~owned] = np.nan
    poisoned = _pack(case, q, k, v, kv_lens, tables, cu, n)
    return poisoned, clean


def input_specs(
    t: int,
    r: int,
    b: int,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype,
    block_size: int,
    num_blocks: int,
) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract kernel inputs (q, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, num_seqs)
    of a step with T tokens, R request rows and B table entries, for jax.export."""
    sds = jax.ShapeDtypeStruct
    cache = sds((num_blocks, block_size, num_kv_heads, head_dim), dtype)
    i32 = jnp.int32
    return (
        sds((t, num_q_heads, head_dim), dtype),
        cache,
        cache,
        sds((r,), i32),
        sds((r, b), i32),
        sds((r + 1,), i32),
        sds((1,), i32),
    )


def _pack(case: Case, q, k, v, kv_lens, tables, cu, n) -> dict:
    dt = jnp.dtype(case.dtype)
    return dict(
        q=jnp.asarray(q, dt),
        k_cache=jnp.asarray(k, dt),
        v_cache=jnp.asarray(v, dt),
        kv_lens=jnp.asarray(kv_lens),
        block_tables=jnp.asarray(tables),
        cu_q_lens=jnp.asarray(cu),
        num_seqs=jnp.asarray([n], jnp.int32),
    )


def attention_kwargs(case: Case) -> dict:
    """The non-array arguments every kernel and the reference take for this case."""
    return dict(
        sm_scale=case.head_dim**-0.5 if case.sm_scale is None else case.sm_scale,
        sliding_window=case.sliding_window,
        soft_cap=case.soft_cap,
    )


def assert_close(out, ref, case: Case, num_tokens: int, platform: str = "tpu") -> None:
    """`platform`'s kernel output vs reference within the dtype's tolerance (TOLERANCES);
    finite everywhere (a stray read of poison is NaN); padding rows exactly 0."""
    out = np.asarray(jnp.asarray(out, jnp.float32))
    ref = np.asarray(jnp.asarray(ref, jnp.float32))
    assert out.shape == ref.shape, (out.shape, ref.shape)
    total = sum(case.q_lens)
    assert np.isfinite(out).all(), f"{case.name}: non-finite output rows " + str(
        sorted(set(np.nonzero(~np.isfinite(out))[0].tolist()))[:10]
    )
    np.testing.assert_array_equal(out[total:num_tokens], 0.0, err_msg=f"{case.name}: padding")
    atol, rtol = TOLERANCES[platform][case.dtype]
    np.testing.assert_allclose(out, ref, atol=atol, rtol=rtol, err_msg=case.name)


# Jitted once per shape and options: eager op-by-op dispatch of the reference costs more than
# compiling it.
reference = jax.jit(
    ref_ragged_paged_attention, static_argnames=("sm_scale", "sliding_window", "soft_cap")
)


def supports(case: Case, platform: str) -> bool:
    """Whether `platform`'s kernel takes this case's heads, head_dim, block size and dtype."""
    hq, hkv, d, bs = case.num_q_heads, case.num_kv_heads, case.head_dim, case.block_size
    return config_error(platform, hq, hkv, d, bs, case.dtype) is None


def check(case: Case, kernel: Callable, platform: str, **knobs) -> None:
    """kernel(**poisoned inputs, **attention kwargs, **knobs) vs the reference on clean ones."""
    poisoned, clean = make_inputs(case)
    kw = attention_kwargs(case)
    out = kernel(**poisoned, **kw, **knobs)
    assert_close(out, reference(**clean, **kw), case, poisoned["q"].shape[0], platform)


B16 = 16  # the engine's default block size


_BATTERY = (
    Case("decode_only", q_lens=(1, 1, 1, 1, 1), kv_lens=(5, 16, 17, 40, 1)),
    Case("prefill_only", q_lens=(20, 9), kv_lens=(20, 9)),
    Case("mixed", q_lens=(1, 13, 1, 7), kv_lens=(33, 13, 2, 30)),
    Case(
        "block_boundaries",  # contexts at block boundaries +-1, chunked prefill ending there
        q_lens=(1, 1, 1, 2, 1, 3),
        kv_lens=(B16 - 1, B16, B16 + 1, 2 * B16 - 1, 2 * B16, 2 * B16 + 1),
    ),
    Case("long_context", q_lens=(3,), kv_lens=(700,), pad_rows=0),
    Case("gqa1_d64", q_lens=(1, 6), kv_lens=(19, 6), num_q_heads=2, num_kv_heads=2, head_dim=64),
    Case("gqa3", q_lens=(2, 1, 5), kv_lens=(18, 33, 5), num_q_heads=6, num_kv_heads=2),
    Case("gqa8_d64", q_lens=(1, 4), kv_lens=(25, 40), num_q_heads=8, num_kv_heads=1, head_dim=64),
    Case("sliding_window", q_lens=(1, 12, 1), kv_lens=(50, 30, 9), sliding_window=8),
    Case("soft_cap", q_lens=(1, 5), kv_lens=(21, 37), soft_cap=5.0),
    Case("bf16_mixed", q_lens=(1, 10, 1), kv_lens=(40, 10, 17), dtype="bfloat16"),
    Case(
        "bf16_gqa3_d64_window_cap",
        q_lens=(1, 17, 1),
        kv_lens=(45, 30, 16),
        num_q_heads=6,
        num_kv_heads=2,
        head_dim=64,
        dtype="bfloat16",
        sliding_window=20,
        # A cap the scores reach (sm_scale 0.5: scores ~ N(0, 4^2)), so capping changes them.
        soft_cap=5.0,
        sm_scale=0.5,
    ),
    Case("zero_len_rows", q_lens=(1, 0, 4, 0), kv_lens=(9, 0, 4, 3), pad_rows=2),
)

# The standard battery: every backend's kernel is checked on these (where it takes the case:
# `supports`). The cases with the default heads, dtype and options are padded to one shape so
# that each kernel compiles them once (long_context keeps its own: no padding request rows).
_ONE_SHAPE = ("decode_only", "prefill_only", "mixed", "block_boundaries", "zero_len_rows")
_PADDED = {c.name: c for c in pad_alike([c for c in _BATTERY if c.name in _ONE_SHAPE])}
CASES = tuple(_PADDED.get(c.name, c) for c in _BATTERY)
