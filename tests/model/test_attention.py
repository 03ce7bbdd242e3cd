"""The engine's chunked paged attention against the one-softmax reference, on ragged batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.model.attention import AttentionMetadata, xla_paged_attention
from pallas_kernels.ragged_paged_attention.reference import ref_paged_attention

BLOCK_SIZE = 4


def ragged_batch(q_lens, kv_lens, *, hq, hkv, d=16, num_blocks=64, width=None, seed=0):
    """Random q, cache and metadata for requests with these (query, total kv) lengths."""
    rng = np.random.default_rng(seed)
    needed = [-(-kv // BLOCK_SIZE) for kv in kv_lens]
    width = width or max(needed)
    ids = rng.permutation(np.arange(1, num_blocks))  # shuffled: tables are not contiguous
    tables = np.zeros((len(q_lens), width), np.int32)
    offset = 0
    for i, n in enumerate(needed):
        tables[i, :n] = ids[offset : offset + n]
        offset += n
    positions, req_idx = [], []
    for i, (q, kv) in enumerate(zip(q_lens, kv_lens, strict=True)):
        positions += list(range(kv - q, kv))
        req_idx += [i] * q
    t = len(positions)
    md = AttentionMetadata(
        slot_mapping=jnp.zeros(t, jnp.int32),
        token_req_idx=jnp.asarray(req_idx, jnp.int32),
        block_tables=jnp.asarray(tables),
        kv_lens=jnp.asarray(kv_lens, jnp.int32),
        cu_q_lens=jnp.asarray(np.cumsum([0, *q_lens]), jnp.int32),
    )
    shape = (num_blocks, BLOCK_SIZE, hkv, d)
    k = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    v = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q = jnp.asarray(rng.standard_normal((t, hq, d)), jnp.float32)
    return q, k, v, jnp.asarray(positions, jnp.int32), md


CASES = {
    "decode_only": ([1, 1, 1, 1], [5, 17, 32, 1]),
    "prefill_only": ([9, 16], [9, 16]),
    "mixed": ([1, 7, 1, 12], [30, 20, 3, 12]),
    "block_boundaries": ([1, 1, 1, 2], [BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 8 * 4 + 1]),
    "chunked_prefill_tail": ([5], [40]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("window, cap", [(None, None), (6, None), (None, 5.0)])
def test_chunked_matches_reference(case, hq, hkv, window, cap):
    q, k, v, pos, md = ragged_batch(*CASES[case], hq=hq, hkv=hkv)
    kw = dict(sm_scale=0.25, sliding_window=window, soft_cap=cap)
    got = jax.jit(lambda *a: xla_paged_attention(*a, **kw))(q, k, v, pos, md)
    want = jax.jit(
        lambda q, k, v, pos, md: ref_paged_attention(
            q, k, v, pos, md.token_req_idx, md.block_tables, **kw
        )
    )(q, k, v, pos, md)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_independent_of_block_table_width():
    # The bucket B grows with the batch's longest request; a request's output must not change.
    narrow = ragged_batch([3, 1], [10, 7], hq=4, hkv=2)
    wide = ragged_batch([3, 1], [10, 7], hq=4, hkv=2, width=32)
    fn = jax.jit(lambda *a: xla_paged_attention(*a, sm_scale=0.3))
    assert np.array_equal(np.asarray(fn(*narrow)), np.asarray(fn(*wide)))


def test_sees_only_its_own_keys():
    # Poisoning every block a request does not own must not change its output.
    q, k, v, pos, md = ragged_batch([2, 1], [6, 5], hq=4, hkv=2)
    owned = np.unique(np.asarray(md.block_tables))
    poison = np.setdiff1d(np.arange(k.shape[0]), owned)
    fn = jax.jit(lambda *a: xla_paged_attention(*a, sm_scale=0.3))
    clean = fn(q, k, v, pos, md)
    k2, v2 = k.at[poison].set(1e4), v.at[poison].set(-1e4)
    assert np.array_equal(np.asarray(fn(q, k2, v2, pos, md)), np.asarray(clean))


@pytest.mark.parametrize("window", [None, 6])
def test_one_request_row_matches_many(window):
    # R == 1 gathers each chunk of blocks once for all tokens; the same request as row 0 of a
    # two-row table (the per-token gather) must attend the same way.
    q, k, v, pos, md = ragged_batch([9], [30], hq=6, hkv=2)
    two = AttentionMetadata(
        slot_mapping=md.slot_mapping,
        token_req_idx=md.token_req_idx,
        block_tables=jnp.concatenate([md.block_tables, jnp.zeros_like(md.block_tables)]),
        kv_lens=jnp.asarray([30, 0], jnp.int32),
        cu_q_lens=jnp.asarray([0, 9, 9], jnp.int32),
    )
    fn = jax.jit(lambda *a: xla_paged_attention(*a, sm_scale=0.3, sliding_window=window))
    one_row, two_rows = np.asarray(fn(q, k, v, pos, md)), np.asarray(fn(q, k, v, pos, two))
    assert np.array_equal(one_row, two_rows)  # the same products, summed in the same order
