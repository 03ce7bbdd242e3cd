"""The on-device sampler (jitted, as the runner calls it) and its host-side metadata builder."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.request import Request
from jaxserve.runner.sampler import (
    SamplingMetadata,
    apply_min_p,
    apply_penalties,
    sample,
)
from jaxserve.runner.sampling_metadata import (
    SamplingRow,
    _all_minus_one,
    build_sampling_metadata,
    fold_seed,
    required_penalty_len,
)
from jaxserve.runner.top_k_top_p import apply_top_k_top_p
from jaxserve.sampling_params import MAX_BANNED_TOKEN_IDS, MAX_LOGPROBS, SamplingParams

jit_sample = jax.jit(sample)


def row(seed: int = 0, step: int = 0, prompt=(1, 2), output=(), eos=None, **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), seed, step, list(prompt), list(output), eos)


def md_for(rows, num_rows: int | None = None, penalty_len: int | None = None) -> SamplingMetadata:
    num_rows = len(rows) if num_rows is None else num_rows
    if penalty_len is None:
        penalty_len = max(required_penalty_len(rows), 1)
    return build_sampling_metadata(rows, num_rows, penalty_len)


def run(logits, rows, **kw):
    out = jit_sample(jnp.asarray(logits, jnp.float32), md_for(rows, **kw))
    return jax.tree.map(np.asarray, out)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def random_logits(r: int, v: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, (r, v)).astype(np.float32)


# ---- greedy ------------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = random_logits(8, 32)
    out = run(logits, [row(temperature=0.0) for _ in range(8)])
    np.testing.assert_array_equal(out.token_ids, logits.argmax(-1))


@settings(max_examples=15, deadline=None)
@given(
    perm=st.permutations(list(range(32))),
    seed=st.integers(0, 2**31),
    top_p=st.floats(0.05, 1.0),
)
def test_top_k_1_and_tiny_temperature_are_greedy(perm, seed, top_p):
    # distinct logits 0.5 apart: far more than temperature 1e-3 lets Gumbel noise (< ~25) move
    base = np.asarray(perm, np.float32) * 0.5
    logits = np.stack([base, base[::-1], np.roll(base, 7), -base])
    greedy = logits.argmax(-1)
    rows_k1 = [row(seed=seed + i, step=i, top_k=1, top_p=top_p) for i in range(4)]
    rows_cold = [row(seed=seed + i, step=i, temperature=1e-3) for i in range(4)]
    np.testing.assert_array_equal(run(logits, rows_k1).token_ids, greedy)
    np.testing.assert_array_equal(run(logits, rows_cold).token_ids, greedy)


# ---- seeds ---------------------------------------------------------------------------------


def test_same_seed_and_step_same_token_whatever_the_batch():
    v = 32
    logits = np.tile(0.1 * random_logits(1, v, seed=3), (8, 1))  # flat: draws differ
    rows = [row(seed=100 + i, step=5) for i in range(8)]
    alone = run(logits, rows).token_ids

    # reversed order, padded, and batch-mates that switch on the sort / penalty branches
    mates = [
        row(seed=7, top_k=3, top_p=0.5, repetition_penalty=1.3, output=(1, 2)),
        row(seed=8, temperature=0.0, presence_penalty=1.0, output=(4,)),
    ]
    mixed_rows = mates + rows[::-1]
    mixed_logits = np.concatenate([random_logits(2, v, seed=9), logits, np.zeros((6, v))])
    mixed = run(mixed_logits, mixed_rows + [None] * 6, penalty_len=8).token_ids
    np.testing.assert_array_equal(mixed[2:10], alone[::-1])
    # and the draws are not all the same token (the seeds matter)
    assert len(set(alone.tolist())) > 1


def test_different_steps_give_different_draws():
    logits = np.zeros((8, 1000), np.float32)
    tokens = run(logits, [row(seed=42, step=s) for s in range(8)]).token_ids
    assert len(set(tokens.tolist())) >= 7
    again = run(logits, [row(seed=42, step=s) for s in range(8)]).token_ids
    np.testing.assert_array_equal(tokens, again)


def test_empirical_distribution_matches_softmax():
    n, temperature = 4096, 0.7
    base = np.array([1.0, 0.5, 0.0, -0.5, -2.0], np.float32)
    logits = np.tile(base, (n, 1))
    out = run(logits, [row(seed=s, temperature=temperature) for s in range(n)])
    counts = np.bincount(out.token_ids, minlength=5)
    p = np.exp(np_log_softmax(base / temperature))
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
    # df = 4: p = 0.001 at 18.5; loose, and deterministic given the seeds
    assert chi2 < 25.0, (counts, n * p)


# ---- filters -------------------------------------------------------------------------------

PROBS = np.array([0.5, 0.3, 0.15, 0.05], np.float32)


def kept(masked: jax.Array) -> list[int]:
    return np.flatnonzero(np.isfinite(np.asarray(masked)[0])).tolist()


def test_top_k_keeps_only_k_tokens():
    logits = jnp.log(jnp.asarray(PROBS))[None]
    mask = jax.jit(apply_top_k_top_p)
    assert kept(mask(logits, jnp.array([2]), jnp.array([1.0]))) == [0, 1]
    assert kept(mask(logits, jnp.array([0]), jnp.array([1.0]))) == [0, 1, 2, 3]

    n = 2048
    out = run(np.tile(np.log(PROBS), (n, 1)), [row(seed=s, top_k=2) for s in range(n)])
    assert set(out.token_ids.tolist()) == {0, 1}


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.3, [0]),
        (0.5, [0]),
        (0.51, [0, 1]),
        (0.79, [0, 1]),
        (0.81, [0, 1, 2]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_the_minimal_nucleus(top_p, expected):
    # shuffled so the sort matters
    order = np.array([2, 0, 3, 1])
    logits = jnp.log(jnp.asarray(PROBS[order]))[None]
    masked = jax.jit(apply_top_k_top_p)(logits, jnp.array([0]), jnp.array([top_p], jnp.float32))
    assert sorted(order[kept(masked)].tolist()) == expected


def test_top_k_and_top_p_together():
    logits = jnp.log(jnp.asarray(PROBS))[None]
    masked = jax.jit(apply_top_k_top_p)(logits, jnp.array([1]), jnp.array([0.9]))
    assert kept(masked) == [0]


def test_min_p():
    logits = jnp.log(jnp.asarray(PROBS))[None]
    assert kept(apply_min_p(logits, jnp.array([0.4]))) == [0, 1]  # keeps p >= 0.2
    assert kept(apply_min_p(logits, jnp.array([0.0]))) == [0, 1, 2, 3]

    n = 2048
    out = run(np.tile(np.log(PROBS), (n, 1)), [row(seed=s, min_p=0.4) for s in range(n)])
    assert set(out.token_ids.tolist()) == {0, 1}


# ---- penalties and bans ----------------------------------------------------------------------


def np_penalties(logits, prompt, output, rep, presence, frequency):
    out = logits.astype(np.float64).copy()
    seen = sorted(set(prompt) | set(output))
    out[seen] = np.where(out[seen] > 0, out[seen] / rep, out[seen] * rep)
    counts = np.bincount(np.asarray(output, np.int64), minlength=len(logits))
    return out - frequency * counts - presence * (counts > 0)


def test_penalties_match_numpy_reference():
    v = 20
    logits = random_logits(4, v, seed=1)
    rng = np.random.default_rng(2)
    rows = [
        row(prompt=rng.integers(0, v, 6), output=rng.integers(0, v, 9), repetition_penalty=1.7),
        row(prompt=rng.integers(0, v, 3), output=rng.integers(0, v, 12), presence_penalty=0.8),
        row(
            prompt=rng.integers(0, v, 5),
            output=[3, 3, 3, 7],
            frequency_penalty=-1.5,
            presence_penalty=-0.5,
            repetition_penalty=0.6,
        ),
        row(prompt=[1, 2, 3], output=[4, 5]),  # no penalties: untouched
    ]
    md = md_for(rows, penalty_len=32)
    got = np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), md))
    for i, r in enumerate(rows):
        p = r.params
        want = np_penalties(
            logits[i],
            r.prompt_token_ids,
            r.output_token_ids,
            p.repetition_penalty,
            p.presence_penalty,
            p.frequency_penalty,
        )
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[3], logits[3])

    greedy_rows = [
        dataclasses.replace(r, params=r.params.with_updates(temperature=0.0)) for r in rows
    ]
    out = run(logits, greedy_rows, penalty_len=32)
    np.testing.assert_array_equal(out.token_ids, got.argmax(-1))


def test_banned_ids_never_sampled():
    v, n = 8, 512
    logits = np.zeros((n, v), np.float32)
    logits[:, 5] = 20.0  # the eos would win every draw
    logits[:, 6] = 19.0
    rows = [
        row(seed=s, step=0, eos=5, min_tokens=2, stop_token_ids=(6,), temperature=1.0 + s % 2)
        for s in range(n - 1)
    ]
    rows.append(row(eos=5, min_tokens=2, stop_token_ids=(6,), temperature=0.0))
    tokens = run(logits, rows).token_ids
    assert not np.isin(tokens, [5, 6]).any()
    # once min_tokens is reached the ban lifts
    lifted = run(logits[:1], [row(step=2, eos=5, min_tokens=2, temperature=0.0)]).token_ids
    assert lifted.tolist() == [5]


# ---- logprobs ----------------------------------------------------------------------------


def test_logprobs_ranks_and_top_n_match_numpy():
    v = 64
    logits = random_logits(4, v, seed=5)
    rows = [
        row(seed=1, logprobs=5, top_k=10),
        row(seed=2, temperature=0.0, logprobs=0),
        row(seed=3, logprobs=MAX_LOGPROBS, repetition_penalty=2.0, output=(3,)),
        row(seed=4),
    ]
    out = run(logits, rows)
    ref = np_log_softmax(logits)
    for i in range(4):
        t = out.token_ids[i]
        np.testing.assert_allclose(out.logprobs[i], ref[i, t], rtol=1e-5, atol=1e-5)
        assert out.ranks[i] == 1 + (ref[i] > ref[i, t]).sum()
        order = np.argsort(-ref[i])[:MAX_LOGPROBS]
        np.testing.assert_array_equal(out.top_token_ids[i], order)
        np.testing.assert_allclose(out.top_logprobs[i], ref[i, order], rtol=1e-5, atol=1e-5)
    assert out.ranks[1] == 1  # greedy samples the top token


def test_no_logprobs_requested_gives_zeros():
    out = run(random_logits(2, 32), [row(seed=1), row(temperature=0.0)])
    assert (out.logprobs == 0).all() and (out.ranks == 0).all()
    assert (out.top_token_ids == 0).all() and (out.top_logprobs == 0).all()


def test_small_vocab_pads_top_n():
    out = run(np.log(PROBS)[None], [row(logprobs=3)])
    assert out.top_token_ids.shape == (1, MAX_LOGPROBS)
    assert out.top_token_ids[0, :4].tolist() == [0, 1, 2, 3]
    assert np.isneginf(out.top_logprobs[0, 4:]).all()


# ---- padding and the builder -----------------------------------------------------------------


def test_padding_rows_are_harmless():
    v = 32
    logits = random_logits(3, v, seed=11)
    rows = [
        row(seed=1, logprobs=2),
        row(seed=2, top_p=0.9, presence_penalty=0.5, output=(1,)),
        row(seed=3),
    ]
    tight = run(logits, rows)
    padded_logits = np.concatenate([logits, np.full((5, v), np.nan, np.float32)])
    padded = run(padded_logits[:8], rows + [None] * 5, penalty_len=8)
    np.testing.assert_array_equal(padded.token_ids[:3], tight.token_ids)
    np.testing.assert_allclose(padded.logprobs[:3], tight.logprobs)
    # zero-logit padding rows sample a valid id
    out = run(np.concatenate([logits, np.zeros((5, v), np.float32)]), rows + [None] * 5)
    assert ((out.token_ids >= 0) & (out.token_ids < v)).all()


def test_builder_fields():
    rows = [
        row(
            seed=2**40 + 3,
            step=1,
            eos=9,
            min_tokens=3,
            stop_token_ids=(4, 5),
            logprobs=2,
            temperature=0.5,
            top_k=7,
            top_p=0.9,
            min_p=0.1,
        ),
        None,
        row(step=4, eos=9, min_tokens=3, prompt=(1, 2, 3), output=(7, 8), frequency_penalty=1.0),
        row(eos=9, min_tokens=3, ignore_eos=True),
    ]
    md = build_sampling_metadata(rows, 6, required_penalty_len(rows))
    assert required_penalty_len(rows) == 5
    assert md.temperature.tolist() == pytest.approx([0.5, 0, 1, 1, 0, 0])
    assert md.top_k.tolist() == [7, 0, 0, 0, 0, 0]
    assert md.seeds.dtype == np.uint32 and md.seeds[0] == fold_seed(2**40 + 3) != 3
    assert md.steps.tolist() == [1, 0, 4, 0, 0, 0]
    assert md.num_logprobs.tolist() == [2, -1, -1, -1, -1, -1]
    assert md.banned_token_ids.shape == (6, MAX_BANNED_TOKEN_IDS)
    assert md.banned_token_ids[0, :4].tolist() == [4, 5, 9, -1]
    assert (md.banned_token_ids[1:] == -1).all()  # row 2 is past min_tokens, row 3 ignores eos
    assert md.penalty_token_ids[2].tolist() == [1, 2, 3, 7, 8]
    assert md.penalty_prompt_lens.tolist() == [0, 0, 3, 0, 0, 0]
    assert (md.penalty_token_ids[[0, 1, 3, 4, 5]] == -1).all()

    with pytest.raises(ValueError, match="penalty_len"):
        build_sampling_metadata(rows, 6, 4)
    with pytest.raises(ValueError, match="num_rows"):
        build_sampling_metadata(rows, 2, 8)


def test_builder_reuses_the_minus_one_arrays_without_penalties():
    a = build_sampling_metadata([row(), None], 4, 16)
    b = build_sampling_metadata([row(temperature=0.3)], 4, 16)
    assert a.penalty_token_ids is b.penalty_token_ids is _all_minus_one(4, 16)
    assert a.banned_token_ids is b.banned_token_ids
    assert not a.penalty_token_ids.flags.writeable


def test_row_from_request():
    req = Request(
        "r",
        [1, 2, 3],
        SamplingParams(min_tokens=2),
        eos_token_id=0,
        sampling_seed=77,
        max_tokens=16,
    )
    req.append_output_token_ids(5)
    r = SamplingRow.from_request(req)
    assert (r.seed, r.step, r.eos_token_id) == (77, 1, 0)
    assert list(r.output_token_ids) == [5] and r.banned_token_ids == [0]
