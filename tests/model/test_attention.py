"""The engine's chunked paged attention against the one-softmax reference, on ragged batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.model import attention, tiles
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


# Every case as one ragged batch: the requests are independent, so mixing them is a case too.
ALL_Q = [q for qs, _ in CASES.values() for q in qs]
ALL_KV = [kv for _, kvs in CASES.values() for kv in kvs]


@pytest.fixture(params=["default", "small"])
def tiling(request, monkeypatch):
    """The engine's tile sizes, and small ones so that these short requests span several
    query tiles, wide and narrow, and key chunks (the chunking and the online softmax across
    chunks), and tiles walk both their phases (small chunks, then large:
    attention._key_chunks)."""
    if request.param == "small":
        monkeypatch.setattr(tiles, "QUERY_TILE", 4)
        monkeypatch.setattr(tiles, "WIDE_QUERY_TILE", 8)
        monkeypatch.setattr(attention, "_CHUNK_KEYS", 8)
        monkeypatch.setattr(attention, "_TILE_CHUNK_KEYS", 16)
    return request.param


def reference(q, k, v, pos, md, **kw):
    fn = lambda q, k, v, pos, md: ref_paged_attention(  # noqa: E731
        q, k, v, pos, md.token_req_idx, md.block_tables, **kw
    )
    return np.asarray(jax.jit(fn)(q, k, v, pos, md))


@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("window, cap", [(None, None), (6, None), (None, 5.0)])
def test_chunked_matches_reference(tiling, hq, hkv, window, cap):
    q, k, v, pos, md = ragged_batch(ALL_Q, ALL_KV, hq=hq, hkv=hkv, num_blocks=96)
    kw = dict(sm_scale=0.25, sliding_window=window, soft_cap=cap)
    got = jax.jit(lambda *a: xla_paged_attention(*a, **kw))(q, k, v, pos, md)
    np.testing.assert_allclose(np.asarray(got), reference(q, k, v, pos, md, **kw), 2e-5, 2e-5)


def test_host_tiles_match_device_tiles(tiling):
    # step_inputs builds the tiles with numpy; the embedder and these tests let the attention
    # derive them with jnp: one function, both must agree (and cover every prefill token once).
    # two requests long enough for wide tiles, and two padding rows
    cu = np.cumsum([0, *ALL_Q, 300, 257, 0, 0]).astype(np.int32)
    t = int(cu[-1]) + 5
    host = tiles.query_tiles(cu, t)
    dev = jax.jit(lambda c: tiles.query_tiles(c, t, jnp))(jnp.asarray(cu))
    for h, d in zip(jax.tree.leaves(host), jax.tree.leaves(dev), strict=True):
        assert np.array_equal(h, np.asarray(d))
    (starts, lens), (wide_starts, wide_lens) = host
    assert set(wide_lens) <= {0, tiles.WIDE_QUERY_TILE}
    cut = [*zip(starts, lens, strict=True), *zip(wide_starts, wide_lens, strict=True)]
    covered = sorted(s + i for s, n in cut for i in range(n))
    prefill = [i for r, n in enumerate(np.diff(cu)) if n >= 2 for i in range(cu[r], cu[r + 1])]
    assert covered == prefill


@pytest.mark.parametrize("hq, hkv, d", [(6, 2, 16), (9, 3, 64)])  # the second: smollm2's
@pytest.mark.parametrize("kv", [70, 200])  # 200: past a tile's first 128 keys (_key_chunks)
def test_split_does_not_change_a_tokens_bits(tiling, hq, hkv, d, kv, monkeypatch):
    # How the scheduler splits a request's tokens over steps depends on its batch-mates (the
    # token budget); the same token must get the same bits whichever way its prompt was split
    # into query tiles, and a decode the same bits whatever decodes share its step.
    # No wide tiles here: with the small tiles' 8-24 score rows, XLA:CPU rounds the softmax's
    # fused reductions by row count (as _MIN_DECODE_ROWS says for decodes), so a small wide
    # tile and a small narrow one differ in the last bit (measured: [7, 13, 10] against [30]).
    # At the engine's sizes (192 and 768 rows) they agree: test_wide_tiles_give_a_token_...
    monkeypatch.setattr(tiles, "WIDE_QUERY_TILE", 1024)
    q, k, v, pos, md = ragged_batch([30], [kv], hq=hq, hkv=hkv, d=d)
    table = md.block_tables

    def run(q_lens):
        n = len(q_lens)
        split = AttentionMetadata(
            slot_mapping=md.slot_mapping,
            token_req_idx=jnp.asarray(np.repeat(np.arange(n), q_lens), jnp.int32),
            block_tables=jnp.repeat(table, n, axis=0),
            kv_lens=jnp.asarray(kv - 30 + np.cumsum(q_lens), jnp.int32),
            cu_q_lens=jnp.asarray(np.cumsum([0, *q_lens]), jnp.int32),
        )
        return np.asarray(
            jax.jit(lambda *a: xla_paged_attention(*a, sm_scale=0.3))(q, k, v, pos, split)
        )

    whole = run([30])
    for q_lens in ([16, 14], [7, 13, 10], [2, 28], [2, 2, 2, 24]):  # query tiles only
        assert np.array_equal(run(q_lens), whole), q_lens
    # A decode's bits do not depend on how many decodes share its step.
    decodes = run([1] * 30)
    for q_lens in ([29, 1], [28, 1, 1], [10] + [1] * 20, [7, 1, 13, 9]):
        rows = np.flatnonzero(np.repeat(q_lens, q_lens) == 1)
        assert np.array_equal(run(q_lens)[rows], decodes[rows]), q_lens
    # The per-token path and a tile agree to a few ulps, not always to the bit: XLA:CPU hands
    # both scores dots to YNNPACK (a __ynn_fusion), which picks its kernel by shape and ISA,
    # and the per-row [G, D] x [D, keys] (batched over rows) can accumulate in another order
    # than the tile's [64 G, D] x [D, keys]. Measured: bit-equal on the CI machine of the
    # last landing; on an AVX-only (no AVX2) EPYC, 7.2e-7 of the largest output (6 ulps) for
    # (9, 3, 64) and 5.3e-7 for (6, 2, 16). Past a tile's first 128 keys the tile walks
    # 128-key chunks and the decode 32-key ones: measured on an AVX-512 EPYC, 6.0 eps of the
    # largest output at 70 keys (one split for both) and 7.0 at 200, for (9, 3, 64).
    eps = np.finfo(np.float32).eps
    assert np.abs(decodes - whole).max() <= 16 * eps * np.abs(whole).max()


def test_wide_tiles_give_a_token_the_bits_of_narrow_ones():
    # The engine's tile sizes on a prompt long enough for wide tiles: whether a token is in a
    # wide tile (its request had WIDE_QUERY_TILE query tokens in the step) or a narrow one
    # (the rest of the request, or a smaller chunk of it) must not change its bits.
    n = tiles.WIDE_QUERY_TILE + 44
    q, k, v, pos, md = ragged_batch([n], [n], hq=9, hkv=3, d=64, num_blocks=96)

    def run(q_lens):
        split = AttentionMetadata(
            slot_mapping=md.slot_mapping,
            token_req_idx=jnp.asarray(np.repeat(np.arange(len(q_lens)), q_lens), jnp.int32),
            block_tables=jnp.repeat(md.block_tables, len(q_lens), axis=0),
            kv_lens=jnp.asarray(np.cumsum(q_lens), jnp.int32),
            cu_q_lens=jnp.asarray(np.cumsum([0, *q_lens]), jnp.int32),
        )
        return np.asarray(
            jax.jit(lambda *a: xla_paged_attention(*a, sm_scale=0.125))(q, k, v, pos, split)
        )

    whole = run([n])  # one wide tile, then narrow ones
    np.testing.assert_allclose(whole, reference(q, k, v, pos, md, sm_scale=0.125), 2e-5, 2e-5)
    for q_lens in ([100, n - 100], [44, n - 44], [n - 2, 2]):  # narrow only; wide after 44
        assert np.array_equal(run(q_lens), whole), q_lens


def test_nan_poisoned_padding():
    # Blocks a request does not own (the null block too, which pads every table), the cache
    # slots past each request's length, and the step's padding tokens are all NaN: the real
    # tokens' outputs must equal the reference on clean inputs, and padding outputs are 0.
    q_lens, kv_lens = [1, 7, 1, 12], [30, 20, 3, 13]
    q, k, v, pos, md = ragged_batch(q_lens, kv_lens, hq=6, hkv=2)
    kw = dict(sm_scale=0.3, sliding_window=None, soft_cap=None)
    want = reference(q, k, v, pos, md, **kw)
    t = q.shape[0]
    slot_ok = np.zeros(k.shape[:2], bool)  # [num_blocks, block_size]: holds a request's KV
    for row, kv in zip(np.asarray(md.block_tables), kv_lens, strict=True):
        for p in range(kv):
            slot_ok[row[p // BLOCK_SIZE], p % BLOCK_SIZE] = True
    poison = jnp.asarray(~slot_ok)[:, :, None, None]
    kp, vp = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
    pad = 5  # padding tokens: q NaN, row 0, position 0, as step_inputs pads
    qp = jnp.concatenate([q, jnp.full((pad, *q.shape[1:]), jnp.nan)])
    padded = AttentionMetadata(
        slot_mapping=jnp.zeros(t + pad, jnp.int32),
        token_req_idx=jnp.concatenate([md.token_req_idx, jnp.zeros(pad, jnp.int32)]),
        block_tables=jnp.concatenate([md.block_tables, jnp.zeros_like(md.block_tables)]),
        kv_lens=jnp.concatenate([md.kv_lens, jnp.zeros(4, jnp.int32)]),
        cu_q_lens=jnp.concatenate([md.cu_q_lens, jnp.full(4, t, jnp.int32)]),
    )
    posp = jnp.concatenate([pos, jnp.zeros(pad, jnp.int32)])
    got = np.asarray(jax.jit(lambda *a: xla_paged_attention(*a, **kw))(qp, kp, vp, posp, padded))
    np.testing.assert_allclose(got[:t], want, rtol=2e-5, atol=2e-5)
    assert np.array_equal(got[t:], np.zeros_like(got[t:]))


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
    # A padding row (no query tokens, no KV) in the table must change nothing, bit for bit:
    # the row bucket R grows with the batch.
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


def test_bf16_cache_as_bits_attends_and_writes_like_bf16():
    # On CPU a bf16 cache is held as uint16 bit patterns (XLA:CPU converts a bf16 gather's
    # whole operand to f32); writing and attending through the bits must equal real bf16.
    q, k, v, pos, md = ragged_batch(ALL_Q, ALL_KV, hq=6, hkv=2, num_blocks=96)
    as_bits = lambda x: jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)  # noqa: E731
    fn = jax.jit(lambda *a: xla_paged_attention(*a, sm_scale=0.3))
    real = np.asarray(fn(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), pos, md))
    bits = np.asarray(fn(q, as_bits(k), as_bits(v), pos, md))
    assert np.array_equal(real, bits)
    new = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2, 16)), jnp.float32)
    slots = jnp.asarray([5, 9, 40], jnp.int32)
    written = jax.jit(attention.write_kv)(as_bits(k), new, slots)
    assert written.dtype == jnp.uint16
    want = attention.write_kv(k.astype(jnp.bfloat16), new, slots)
    assert np.array_equal(np.asarray(jax.lax.bitcast_convert_type(written, jnp.bfloat16)), want)
    assert attention.kv_storage_dtype(jnp.bfloat16, "cpu", "xla") == jnp.uint16
    assert attention.kv_storage_dtype(jnp.bfloat16, "gpu", "pallas") == jnp.bfloat16
    assert attention.kv_storage_dtype(jnp.float32, "cpu", "xla") == jnp.float32
