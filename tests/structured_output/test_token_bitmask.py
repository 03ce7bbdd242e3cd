"""apply_token_bitmask against a numpy reference: bit order, ragged vocab, mixed rows, jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.runner.token_bitmask import apply_token_bitmask, unpack_token_bitmask


def ref_apply(logits: np.ndarray, bitmask: np.ndarray, has_mask: np.ndarray) -> np.ndarray:
    """The plain loop: token v of a masked row is allowed iff bit v % 32 of word v // 32."""
    out = logits.copy()
    for r in range(logits.shape[0]):
        if not has_mask[r]:
            continue
        for v in range(logits.shape[1]):
            if not (int(bitmask[r, v // 32]) >> (v % 32)) & 1:
                out[r, v] = -np.inf
    return out


def random_case(rng: np.random.Generator, rows: int, vocab: int, words: int | None = None):
    words = words or -(-vocab // 32)
    logits = rng.standard_normal((rows, vocab)).astype(np.float32)
    bitmask = rng.integers(0, 1 << 32, size=(rows, words), dtype=np.uint64).astype(np.uint32)
    return logits, bitmask


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 257])
def test_matches_reference_for_mixed_rows(vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    logits, bitmask = random_case(rng, 5, vocab)
    has_mask = np.array([True, False, True, True, False])
    got = np.asarray(apply_token_bitmask(logits, bitmask, has_mask))
    np.testing.assert_array_equal(got, ref_apply(logits, bitmask, has_mask))
    # unconstrained rows are bit-for-bit the input, whatever their bitmask held
    np.testing.assert_array_equal(got[~has_mask], logits[~has_mask])
    # an int32 has_mask (as a host staging buffer might hold it) means the same
    as_int = np.asarray(apply_token_bitmask(logits, bitmask, has_mask.astype(np.int32)))
    np.testing.assert_array_equal(as_int, got)


def test_no_constrained_row_is_the_identity() -> None:
    logits, bitmask = random_case(np.random.default_rng(1), 4, 70)
    bitmask[:] = 0  # would disallow everything if it were applied
    got = np.asarray(apply_token_bitmask(logits, bitmask, np.zeros(4, bool)))
    np.testing.assert_array_equal(got, logits)
    # and the unpacking sits in a branch of a cond, not in the straight-line program
    jaxpr = jax.make_jaxpr(apply_token_bitmask)(logits, bitmask, np.zeros(4, bool))
    top_level = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
    assert "cond" in top_level and "shift_right_logical" not in top_level


def test_bit_order_is_little_endian_within_a_word() -> None:
    # word 1, bit 3 -> token 35 alone; word 0 = 0b101 -> tokens 0 and 2
    bitmask = np.array([[0b101, 1 << 3], [0, 1 << 31]], dtype=np.uint32)
    allowed = np.asarray(unpack_token_bitmask(jnp.asarray(bitmask), 64))
    assert np.nonzero(allowed[0])[0].tolist() == [0, 2, 35]
    assert np.nonzero(allowed[1])[0].tolist() == [63]


def test_wider_bitmask_than_vocab_and_too_narrow_refused() -> None:
    rng = np.random.default_rng(2)
    logits, bitmask = random_case(rng, 3, 40, words=4)  # 128 bits for 40 tokens
    has_mask = np.ones(3, bool)
    np.testing.assert_array_equal(
        np.asarray(apply_token_bitmask(logits, bitmask, has_mask)),
        ref_apply(logits, bitmask, has_mask),
    )
    with pytest.raises(ValueError, match="vocab_size=40"):
        apply_token_bitmask(logits, bitmask[:, :1], has_mask)


def test_jits_once_for_fixed_shapes_and_keeps_dtype() -> None:
    traces = []

    @jax.jit
    def step(logits, bitmask, has_mask):
        traces.append(1)
        return apply_token_bitmask(logits, bitmask, has_mask)

    rng = np.random.default_rng(3)
    for i, has_mask in enumerate([[True, False], [False, False], [True, True]]):
        logits, bitmask = random_case(rng, 2, 45)
        has_mask = np.array(has_mask)
        got = np.asarray(step(logits, bitmask, has_mask))
        np.testing.assert_array_equal(got, ref_apply(logits, bitmask, has_mask), err_msg=str(i))
    assert len(traces) == 1
    bf16 = step.lower(
        jax.ShapeDtypeStruct((2, 45), jnp.bfloat16),
        jax.ShapeDtypeStruct((2, 2), jnp.uint32),
        jax.ShapeDtypeStruct((2,), jnp.bool_),
    )
    assert bf16.out_info.dtype == jnp.bfloat16
