"""The Mosaic GPU ragged paged attention kernel, run by the GPU interpreter on the CPU, against
the pure-jnp reference.

The interpreter (jax's InterpretGPUParams) simulates the kernel's TMA copies, barriers and
shared memory per CUDA block, so the paging, pipelining, masking, split-K and combine logic
all run here; only the two MMAs go through lax.dot_general (see gpu_kernel.py `mma`).

Inputs come from cases.py, poisoned with NaN wherever a correct kernel must not look (see
there); the standard battery runs here as on the TPU kernel, then cases that exercise what is
particular to this kernel (64-key steps, TMA page counts, split-K, f16, bf16x3 float32).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import pytest

from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.ragged_paged_attention.gpu import (
    config_error,
    default_num_kv_splits,
    ragged_paged_attention_gpu,
)
from tests.kernels.cases import (
    CASES,
    COMPILED,
    INTERPRET,
    Case,
    check,
    kernel_module_for,
    make_inputs,
    pad_alike,
    supports,
)

pytestmark = kernel_module_for("cuda")

# Through the public entry, as the engine calls it (api.py dispatches to gpu.py).
GPU_KERNEL = functools.partial(ragged_paged_attention, platform="cuda", interpret=INTERPRET)


def _run(case: Case, *, detect_races: bool = False, **knobs) -> None:
    if not detect_races or COMPILED:  # compiled: the same case, without the interpreter's eye
        check(case, GPU_KERNEL, "cuda", **knobs)
        return
    # The interpreter's happens-before race detector tracks every TMA, barrier and SMEM access:
    # a TMA refilling a slot the math still reads, or a read before its barrier, is a race.
    # (It catches both: issuing the f32 K refill before the tile is converted, and refilling
    # the bf16 slot in use, were tried and flagged.) It runs on two cases below, one per
    # pipeline: bf16's 2-slot ring (split-K, so several blocks run) and f32's 1-slot landing
    # buffers; it costs no extra compile there.
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    params = InterpretGPUParams(detect_races=True)
    check(case, functools.partial(GPU_KERNEL, interpret=params), "cuda", **knobs)
    assert not get_races().races_found


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_standard_cases(case):
    assert supports(case, "cuda")  # every standard case has head_dim % 64 == 0
    _run(case)


# --- batch shapes of this kernel's units (bf16, GQA 2, head_dim 64; padded alike: one compile) -

_SMALL = dict(num_q_heads=2, num_kv_heads=1, head_dim=64, dtype="bfloat16")
BATCH = pad_alike(
    [
        # Decodes over one, two and more 64-key steps.
        Case("decode_steps", q_lens=(1, 1, 1, 1), kv_lens=(1, 9, 40, 77), **_SMALL),
        Case("prefill", q_lens=(13, 22), kv_lens=(13, 22), **_SMALL),
        # A chunked prefill with earlier context, two decodes, a request with no query tokens
        # this step (between two real ones) and a fresh prefill.
        Case("mixed_empty_prefix", (20, 1, 0, 1, 13), (52, 30, 17, 5, 13), **_SMALL),
        # Contexts one short of, at, and one past a page edge and a 64-key step edge.
        Case("step_edges", (1, 2, 1, 3, 1, 2), (15, 16, 17, 63, 64, 65), **_SMALL),
    ]
)


@pytest.mark.parametrize("case", BATCH, ids=[c.name for c in BATCH])
def test_batches(case):
    _run(case)


@pytest.mark.parametrize("block_size", [32, 8])
def test_block_boundaries_other_block_sizes(block_size):
    # 32: two pages per 64-key step; 8: eight TMAs arriving on one barrier per step.
    kv = (block_size - 1, block_size, block_size + 1, 63, 64, 65)
    _run(Case(f"bs{block_size}", (1, 2, 1, 3, 1, 1), kv, block_size=block_size, **_SMALL))


@pytest.mark.parametrize(
    ("num_kv_splits", "sliding_window", "detect_races"), [(4, None, True), (3, 300, False)]
)
def test_long_context_split_k(num_kv_splits, sliding_window, detect_races):
    # A long context cut into kv splits merged by the combine step, next to a short request
    # whose extra splits are empty and must weigh nothing; with a window, the splits divide
    # only the window's steps (keys 699..999 here, not 0..999). sm_scale=1 makes the
    # softmax peaky, so the splits' log-sum-exps differ by far and a wrong merge weight shows.
    small = dict(_SMALL, num_q_heads=4)
    case = Case("split_k", (2, 1), (1000, 3), sm_scale=1.0, sliding_window=sliding_window, **small)
    _run(case, num_kv_splits=num_kv_splits, detect_races=detect_races)


def test_default_splits_split_a_small_batch_with_long_contexts():
    assert default_num_kv_splits(2, 1, 4096) == 8  # 2 blocks, 4096 keys: split
    assert default_num_kv_splits(200, 8, 4096) == 1  # the SMs are already full
    assert default_num_kv_splits(2, 1, 256) == 1  # too short to pay for a combine


# --- heads, dims, dtypes, attention variants (combined: each combination is one compile) ------

_MIX3 = dict(q_lens=(5, 1, 12), kv_lens=(40, 19, 12))


# (GQA 3, head_dim 64, bf16 with a soft cap the scores reach is the standard battery's
# bf16_gqa3_d64_window_cap.) sm_scale 0.125 as these cases were measured with.
VARIANTS = [
    Case("gqa1_d128_f16", **_MIX3, num_q_heads=2, num_kv_heads=2, dtype="float16", sm_scale=0.125),
    # f32 runs as three bf16 MMAs per product (hi/lo split); it must stay near f32 accuracy.
    Case(
        "f32_bf16x3_gqa4_window",
        (9, 1, 0, 1, 14),
        (80, 33, 5, 64, 14),
        num_q_heads=8,
        head_dim=64,
        sliding_window=50,
        sm_scale=0.125,
    ),
    # The window drops whole 64-key steps for the long request and cuts inside a step too.
    Case(
        "gqa8_d128_window",
        (6, 1, 30),
        (150, 90, 30),
        num_q_heads=16,
        sliding_window=40,
        dtype="bfloat16",
        sm_scale=0.125,
    ),
]


@pytest.mark.parametrize("case", VARIANTS, ids=[c.name for c in VARIANTS])
def test_variants(case):
    _run(case, detect_races=case.dtype == "float32")  # f32's landing-buffer pipeline


# --- input validation -------------------------------------------------------------------------


def _inputs(case: Case | None = None, **over) -> dict:
    poisoned, _ = make_inputs(case or Case("v", (1,), (5,), **_SMALL))
    return dict(poisoned, **over)


@pytest.mark.parametrize(
    "over,knobs,match",
    [
        (
            dict(
                q=jnp.zeros((2, 3, 64), jnp.bfloat16),
                k_cache=jnp.zeros((4, 16, 2, 64), jnp.bfloat16),
                v_cache=jnp.zeros((4, 16, 2, 64), jnp.bfloat16),
            ),
            {},
            "num_q_heads=3 must be a positive multiple of num_kv_heads=2",
        ),
        (dict(q=jnp.zeros((4, 2, 64), jnp.int8)), {}, "q.dtype must be one of .* got int8"),
        (
            dict(
                q=jnp.zeros((2, 2, 128), jnp.float32),
                k_cache=jnp.zeros((4, 16, 1, 128), jnp.float32),
                v_cache=jnp.zeros((4, 16, 1, 128), jnp.float32),
            ),
            dict(block_kv=128),
            "block_kv=128 with head_dim=128 and float32 needs",
        ),
        (dict(cu_q_lens=jnp.zeros((5,), jnp.int32)), {}, r"cu_q_lens must have shape \(3,\)"),
        ({}, dict(block_kv=48), "block_kv=48"),
        ({}, dict(num_kv_splits=0), "num_kv_splits=0"),
        ({}, dict(sliding_window=0), "sliding_window .* got 0"),
        ({}, dict(soft_cap=-1.0), "soft_cap .* got -1.0"),
    ],
)
def test_rejects_bad_inputs_and_knobs_with_their_values(over, knobs, match):
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention_gpu(**_inputs(**over), sm_scale=1.0, **knobs)


def test_config_error_names_what_the_engine_must_keep_on_xla():
    assert config_error(32, 8, 128, 16, jnp.bfloat16) is None
    assert config_error(32, 8, 64, 32, jnp.float32) is None
    assert "head_dim=16 must be a multiple of 64" in config_error(4, 2, 16, 16, jnp.float32)
    assert "needs" in config_error(32, 8, 128, 128, jnp.float32)  # f32 with 128-slot pages
    assert "block_size=4" in config_error(32, 8, 128, 4, jnp.bfloat16)


def test_standard_cases_the_kernel_refuses_are_named():
    # `supports` (config_error) is what selects the standard cases above; a head_dim 96 case
    # is refused, so a battery gaining one cannot pass unnoticed through an unsupported path.
    assert not supports(dataclasses.replace(CASES[0], head_dim=96), "cuda")
    assert supports(dataclasses.replace(CASES[0], head_dim=96), "tpu")
