"""The Mosaic TPU ragged paged attention kernel in the TPU interpreter vs the jnp reference.

The interpreter models the kernel's DMAs and semaphores and fills uninitialised VMEM with NaN;
the inputs have NaN wherever a correct kernel must not read (see cases.py), so a stray read of
an unused block, a slot past a request's length, or a buffer row no DMA filled fails the test.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from tests.kernels.cases import (
    CASES,
    COMPILED,
    INTERPRET,
    Case,
    assert_close,
    attention_kwargs,
    check,
    interpreter_only,
    kernel_module_for,
    make_inputs,
    reference,
    supports,
)

pytestmark = kernel_module_for("tpu")

TPU_KERNEL = functools.partial(ragged_paged_attention, platform="tpu", interpret=INTERPRET)
# The public entry under jit with its options and knobs static (what the engine's step does).
JIT_TPU_KERNEL = jax.jit(
    TPU_KERNEL,
    static_argnames=(
        "sm_scale",
        "sliding_window",
        "soft_cap",
        "q_block",
        "kv_pages_per_chunk",
        "interpret",
    ),
)
# The interpreter's race detector: the prefetch of chunk j+1 never touches the buffer that
# chunk j's compute reads. It runs where the double buffer flips most (one page per chunk).
# Compiled, the same calls run on the TPU itself (no interpreter, no detector).
RACES = False if COMPILED else pltpu.InterpretParams(detect_races=True)


def _assert_no_races() -> None:
    if COMPILED:
        return
    # The detector's verdict is module state (no public accessor in jax 0.10.2).
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

    assert ipc.races is not None and ipc.races.races_found is False


def _run(case: Case, **knobs):
    check(case, TPU_KERNEL, "tpu", **knobs)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernel_matches_reference(case):
    assert supports(case, "tpu")  # the standard battery is all TPU-shaped
    _run(case)


BY_NAME = {c.name: c for c in CASES}


@pytest.mark.parametrize(
    "name,knobs",
    [
        # One page per chunk: many chunks per request, the double buffer flips on every one
        # and prefetches across request boundaries inside a tile.
        ("mixed", dict(q_block=8, kv_pages_per_chunk=1, interpret=RACES)),
        # A chunk width that does not divide the table (tables padded) and a sliding window
        # that starts mid-chunk.
        ("sliding_window", dict(q_block=16, kv_pages_per_chunk=3)),
        ("bf16_mixed", dict(q_block=16, kv_pages_per_chunk=2)),
    ],
)
def test_kernel_knobs(name, knobs):
    if not COMPILED:
        pltpu.reset_tpu_interpret_mode_state()
    check(BY_NAME[name], JIT_TPU_KERNEL, "tpu", **knobs)
    if knobs.get("interpret") is RACES:
        _assert_no_races()


def test_block_size_32_and_many_tiles():
    _run(Case("bs32", q_lens=(1, 9, 1, 1), kv_lens=(70, 9, 33, 31), block_size=32), q_block=8)


def _inputs(**over):
    poisoned, _ = make_inputs(Case("v", q_lens=(1, 3), kv_lens=(5, 3)))
    poisoned.update(over)
    return poisoned


@pytest.mark.parametrize(
    "over,knobs,match",
    [
        (dict(q=jnp.zeros((7, 3, 128))), {}, r"num_q_heads=3 .*num_kv_heads=2"),
        (dict(q=jnp.zeros((7, 4, 64))), {}, r"head_dim of q \(64\) != .*\(128\)"),
        (dict(q=jnp.zeros((7, 4, 128), jnp.bfloat16)), {}, r"dtypes must match.*bfloat16"),
        (dict(q=jnp.zeros((7, 4, 128), jnp.float16)), {}, r"q.dtype must be .*float16"),
        (dict(cu_q_lens=jnp.zeros((2,), jnp.int32)), {}, r"cu_q_lens must have shape \(4,\)"),
        (dict(kv_lens=jnp.zeros((3,), jnp.float32)), {}, r"kv_lens.dtype must be int32"),
        (dict(num_seqs=jnp.zeros((), jnp.int32)), {}, r"num_seqs must have shape \(1,\)"),
        (dict(k_cache=jnp.zeros((9, 4, 2, 128))), {}, r"v_cache shape .* != k_cache shape"),
        (
            dict(k_cache=jnp.zeros((9, 4, 2, 128)), v_cache=jnp.zeros((9, 4, 2, 128))),
            {},
            r"block_size=4 must be a multiple of 8",
        ),
        ({}, dict(q_block=12), r"q_block=12 must be a positive multiple of 8"),
        ({}, dict(kv_pages_per_chunk=0), r"kv_pages_per_chunk must be positive, got 0"),
        ({}, dict(num_warps=4), r"unknown TPU kernel knobs \['num_warps'\]"),
    ],
)
def test_validation_names_the_bad_value(over, knobs, match):
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(
            **_inputs(**over), sm_scale=0.1, platform="tpu", interpret=INTERPRET, **knobs
        )


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(sm_scale=0.0), r"sm_scale must be > 0, got 0.0"),
        (dict(sm_scale=1.0, sliding_window=0), r"sliding_window .* got 0"),
        (dict(sm_scale=1.0, soft_cap=-1.0), r"soft_cap .* got -1.0"),
        (dict(sm_scale=1.0, platform="rocm"), r"platform must be one of .*'rocm'"),
        pytest.param(dict(sm_scale=1.0), r"no Pallas .* natively on 'cpu'", marks=interpreter_only),
    ],
)
def test_bad_options_named(kw, match):
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(**_inputs(), **kw)


def test_jittable_with_static_knobs():
    # decode_only has mixed's padded shape: this reuses test_kernel_knobs[mixed]'s compile.
    case = BY_NAME["decode_only"]
    poisoned, clean = make_inputs(case)
    kw = attention_kwargs(case)
    knobs = dict(q_block=8, kv_pages_per_chunk=1, interpret=RACES)
    out = JIT_TPU_KERNEL(**poisoned, **kw, **knobs)
    assert_close(out, reference(**clean, **kw), case, out.shape[0])
    np.testing.assert_array_equal(out, JIT_TPU_KERNEL(**poisoned, **kw, **knobs))  # deterministic
    _assert_no_races()


@pytest.mark.parametrize(
    "backend,interpret,want", [("tpu", False, "tpu"), ("gpu", False, "cuda"), ("cpu", True, "tpu")]
)
def test_platform_resolution(monkeypatch, backend, interpret, want):
    from pallas_kernels.ragged_paged_attention import api

    monkeypatch.setattr(api.jax, "default_backend", lambda: backend)
    assert api.resolve_platform(None, interpret) == want
    assert api.resolve_platform("cuda", interpret) == "cuda"  # an explicit platform wins
