"""The top-k / top-p filter ranks a few candidates and bisects the vocab only when it must: its
kept set equals a float64 full-sort reference on both paths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.runner.top_k_top_p import apply_top_k_top_p

V = 64
CANDIDATES = 8  # small, so rows reach past the candidates and take the bisection


def reference_kept(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """bool[V]: vLLM's order (top-k, then top-p over the renormalized top k), by a sort."""
    x = logits.astype(np.float64)
    desc = np.sort(x)[::-1]
    k = top_k if 0 < top_k < len(x) else len(x)
    kth = desc[k - 1]
    top = desc[:k]
    probs = np.exp(top - top[0]) / np.exp(top - top[0]).sum()
    before = np.cumsum(probs) - probs
    nucleus = top[(before < top_p) | (top_p >= 1.0)]
    return (x >= max(kth, nucleus.min())) & np.isfinite(x)  # -inf stays -inf


def kept(logits: np.ndarray, top_k, top_p, active=None, candidates: int = CANDIDATES):
    f = jax.jit(apply_top_k_top_p, static_argnames="candidates")
    out = f(
        jnp.asarray(logits),
        jnp.asarray(top_k, jnp.int32),
        jnp.asarray(top_p, jnp.float32),
        None if active is None else jnp.asarray(active),
        candidates=candidates,
    )
    out = np.asarray(out)
    # kept logits pass through unchanged, the rest are -inf
    assert np.array_equal(out[np.isfinite(out)], logits[np.isfinite(out)])
    return np.isfinite(out)


def rows(scale: float, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).normal(0, 1, (n, V)) * scale).astype(np.float32)


@pytest.mark.parametrize(
    ("scale", "top_k", "top_p", "path"),
    [
        (6.0, 0, 0.9, "candidates"),  # peaked: the nucleus ends among the 8 largest
        (6.0, 5, 0.7, "candidates"),
        (6.0, 8, 1.0, "candidates"),
        (0.2, 0, 0.95, "bisect"),  # flat: the nucleus holds most of the vocab
        (6.0, 20, 1.0, "bisect"),  # top-k past the candidates
        (0.2, 20, 0.5, "bisect"),
        (6.0, V, 0.9, "candidates"),  # k >= V is off
        (6.0, 0, 1.0, "candidates"),  # both off: everything kept
    ],
)
def test_kept_set_equals_the_sorted_reference(scale, top_k, top_p, path):
    logits = rows(scale, 16, seed=int(scale * 10) + top_k)
    got = kept(logits, [top_k] * 16, [top_p] * 16)
    for i in range(16):
        assert np.array_equal(got[i], reference_kept(logits[i], top_k, top_p)), i
    sizes = got.sum(-1)
    if path == "bisect":  # the answer needs more tokens than the candidates hold
        assert sizes.max() > CANDIDATES


def test_one_row_past_the_candidates_bisects_the_batch_and_all_rows_stay_exact():
    logits = np.concatenate([rows(6.0, 7, seed=1), rows(0.2, 1, seed=2)])
    top_k = [0, 3, 0, 8, 0, 0, 2, 0]
    top_p = [0.9, 1.0, 0.5, 0.8, 1.0, 0.99, 0.3, 0.95]
    got = kept(logits, top_k, top_p)
    assert got[-1].sum() > CANDIDATES
    for i in range(8):
        assert np.array_equal(got[i], reference_kept(logits[i], top_k[i], top_p[i])), i


def test_rows_that_do_not_sample_never_force_the_bisection():
    # a flat greedy row (active False) would need the bisection; it is answered from the candidates
    # (its mask is unused: greedy rows take the argmax), while the active row stays exact
    logits = np.concatenate([rows(0.2, 1, seed=3), rows(6.0, 1, seed=4)])
    got = kept(logits, [0, 0], [0.95, 0.9], active=[False, True])
    assert got[0].sum() <= CANDIDATES < reference_kept(logits[0], 0, 0.95).sum()
    assert np.array_equal(got[1], reference_kept(logits[1], 0, 0.9))


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 0.95), (20, 1.0), (30, 0.9), (0, 0.999)])
def test_banned_tokens_and_ties_on_the_bisection(top_k, top_p):
    # structured output and bans leave -inf logits; rounded logits tie often
    rng = np.random.default_rng(top_k)
    logits = np.round(rows(0.5, 8, seed=9), 1)
    logits[rng.random(logits.shape) < 0.5] = -np.inf
    logits[0] = [1.0] + [-np.inf] * (V - 1)  # one allowed token
    got = kept(logits, [top_k] * 8, [top_p] * 8)
    for i in range(8):
        assert np.array_equal(got[i], reference_kept(logits[i], top_k, top_p)), i
    assert got[0].tolist() == [True] + [False] * (V - 1)


def test_ties_at_the_threshold_are_all_kept():
    logits = np.array([[3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]], np.float32)
    got = kept(logits, [2], [1.0], candidates=4)  # the 2nd largest ties with eight more
    assert got[0].tolist() == [True] * 10 + [False]


def test_the_default_candidates_match_a_full_sort_on_a_real_vocab():
    logits = (np.random.default_rng(5).normal(0, 3, (4, 49152))).astype(np.float32)
    top_k, top_p = [0, 40, 0, 0], [0.9, 0.95, 0.5, 1.0]
    got = kept(logits, top_k, top_p, candidates=1024)
    full = kept(logits, top_k, top_p, candidates=49152)
    assert np.array_equal(got, full)
    for i in range(4):
        assert np.array_equal(got[i], reference_kept(logits[i], top_k[i], top_p[i])), i


def test_the_compiled_filter_never_sorts_the_vocab():
    # XLA:CPU turns lax.top_k into a full sort when the values have two users (32 x 49152:
    # 300 ms instead of 17), and the fallback bisects instead of sorting: no sort anywhere
    lowered = jax.jit(apply_top_k_top_p).lower(
        jnp.zeros((8, 49152)), jnp.zeros(8, jnp.int32), jnp.ones(8)
    )
    hlo = lowered.compile().as_text()
    assert 'custom_call_target="TopK"' in hlo
    assert " sort(" not in hlo
