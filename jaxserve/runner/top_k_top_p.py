"""The top-k / top-p (nucleus) filter of the sampler, with no sort of a large vocab.

Both filters keep every logit at or above one per-row threshold: the k-th largest logit, and
the smallest logit of the minimal nucleus. Both usually lie among a row's largest logits, so
the filter ranks only the `TOP_CANDIDATES` largest with `lax.top_k`; when some sampling row's
filter reaches past them (a large k, a flat distribution), the step finds the thresholds by
bisection over the whole row instead (under `lax.cond`, so other steps pay nothing for it).

Sorting [64, 49152] f32 logits, as the filter did before, took 865 ms on this 2-core CPU: one
request with top_p < 1 cost its batch more than half its throughput (SmolLM2, 32 requests at
temperature 1: top_p 0.95 ran at 0.43x the plain run's tok/s). With this filter: 43 ms from the
candidates, 153 ms by bisection, and 0.96x (bench/sampler.py, one run).

The kept set is a float64 sort's up to the f32 rounding of the nucleus mass: on flat rows (0.95
spread over ~18000 tokens) the old f32 cumsum missed by a token on 5 rows of 64, the bisection's
masked sums on 1.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

# Ranked by lax.top_k on the fast path (its cost grows with it: [64, 49152] took 10 ms for 64,
# 36 ms for 1024); a nucleus or top-k wider than this takes the bisection.
TOP_CANDIDATES = 1024


def _threshold(
    ranked: jax.Array,  # f32[R, C] each row's C largest logits, descending (C = V: all)
    full_z: jax.Array,  # f32[R, 1] sum of exp(logit - row max) over the whole row
    k: jax.Array,  # i32[R] top-k in [0, C], 0 = off
    top_p: jax.Array,  # f32[R] 1 = off
) -> tuple[jax.Array, jax.Array]:  # (f32[R, 1] threshold, f32[R] the C ranked tokens' mass)
    """The one threshold both filters leave, from a row's largest logits in order.

    The nucleus keeps ranked token i while the mass strictly before it is < top_p (the
    smallest set whose mass reaches top_p); with top-k on, the mass is renormalized over the
    top k (vLLM's order: top-k, then top-p). Ties at the threshold are all kept."""
    c = ranked.shape[-1]
    on = k > 0
    kth = jnp.take_along_axis(ranked, jnp.maximum(k - 1, 0)[:, None], axis=-1)
    kth = jnp.where(on[:, None], kth, -jnp.inf)
    kept = jnp.where(jnp.arange(c)[None, :] < jnp.where(on, k, c)[:, None], ranked, -jnp.inf)
    exp = jnp.exp(kept - ranked[:, :1])  # ranked[:, 0] is the row max
    z = jnp.where(on[:, None], jnp.sum(exp, axis=-1, keepdims=True), full_z)
    probs = exp / z
    mass = jnp.cumsum(probs, axis=-1)
    in_nucleus = mass - probs < top_p[:, None]
    # the first ranked token is always in (mass before it is 0 < top_p): the min is finite
    p_threshold = jnp.min(jnp.where(in_nucleus, kept, jnp.inf), axis=-1, keepdims=True)
    p_threshold = jnp.where(top_p[:, None] >= 1.0, -jnp.inf, p_threshold)  # top-p off
    return jnp.maximum(kth, p_threshold), mass[:, -1]


def _sorted(logits: jax.Array) -> jax.Array:  # f32[R, V] descending
    return -jnp.sort(-logits, axis=-1)


def _order_keys(x: jax.Array) -> jax.Array:  # u32, same shape: a < b iff key(a) < key(b)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    # negative floats order backwards as integers: flip all their bits; positives: the sign
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _from_order_keys(key: jax.Array) -> jax.Array:  # the inverse of _order_keys
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _bisect(
    lo: jax.Array,  # u32[R] pred(lo) is False
    hi: jax.Array,  # u32[R] pred(hi) is True (pred is monotone: False ... False True ... True)
    pred: Callable[[jax.Array], jax.Array],  # u32[R, 1] -> bool[R]
) -> jax.Array:  # u32[R] the smallest key where pred holds
    def step(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        holds = pred(mid[:, None])
        return jnp.where(holds, lo, mid), jnp.where(holds, mid, hi)

    return lax.fori_loop(0, 32, step, (lo, hi))[1]  # 2^32 keys: 32 halvings


def _bisected_threshold(
    logits: jax.Array,  # f32[R, V]
    k: jax.Array,  # i32[R] top-k in [0, V), 0 = off
    top_p: jax.Array,  # f32[R] 1 = off
) -> jax.Array:  # f32[R, 1]
    """The sort's threshold without the sort: bisection over the floats' order keys, 32
    masked reductions over [R, V] per threshold (64 flat rows x 49152: 153 ms against the
    sort's 785 ms here). Both thresholds are logits of the row, so the kept set is the sort's, up
    to the order the nucleus mass is summed in."""
    keys = _order_keys(logits)
    lo, hi = jnp.min(keys, axis=-1) - 1, jnp.max(keys, axis=-1)
    # the k-th largest: the largest key that k or more logits reach (the smallest that fewer
    # than k do, less one)
    kth = _bisect(lo, hi + 1, lambda t: jnp.sum(keys >= t, axis=-1) < k) - 1
    kth = jnp.where(k > 0, kth, lo + 1)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    above = keys > kth[:, None]
    exp = jnp.where(keys >= kth[:, None], jnp.exp(logits - row_max), 0.0)
    # top-k renormalizes over exactly k tokens, as the sort's first k positions: the logits
    # above the k-th, and as many copies of the k-th as fill k (ties past them are kept by
    # the threshold, not counted in the mass)
    z_k = jnp.sum(jnp.where(above, exp, 0.0), axis=-1) + (
        k - jnp.sum(above, axis=-1, dtype=jnp.int32)
    ) * jnp.exp(_from_order_keys(kth) - row_max[:, 0])
    z = jnp.where(k > 0, z_k, jnp.sum(exp, axis=-1))
    probs = exp / z[:, None]
    # the nucleus' smallest logit: the smallest key whose strictly larger logits' mass is
    # below top_p (what "the mass strictly before it < top_p" is in sorted order)
    nucleus = _bisect(lo, hi, lambda t: jnp.sum(jnp.where(keys > t, probs, 0.0), axis=-1) < top_p)
    nucleus = jnp.where(top_p >= 1.0, lo + 1, nucleus)
    return _from_order_keys(jnp.maximum(kth, nucleus))[:, None]


def filter_threshold(
    logits: jax.Array,  # f32[R, V] already divided by temperature
    top_k: jax.Array,  # i32[R] 0 = off
    top_p: jax.Array,  # f32[R] 1 = off
    active: jax.Array | None = None,  # bool[R] rows that sample; None: all
    candidates: int | None = None,  # static; None: TOP_CANDIDATES when traced
) -> jax.Array:  # f32[R, 1] keep logits >= it
    """The threshold from the `candidates` largest logits, or by bisection over the whole
    row when some active row's top-k or nucleus reaches past them."""
    _, v = logits.shape
    c = min(TOP_CANDIDATES if candidates is None else candidates, v)
    k = jnp.where((top_k > 0) & (top_k < v), top_k, 0)  # k >= V keeps everything: off
    full_z = jnp.sum(jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), -1, keepdims=True)
    if c == v:  # the candidates would be the whole vocab: sort it, with no fallback
        return _threshold(_sorted(logits), full_z, k, top_p)[0]
    ranked, _ = lax.top_k(logits, c)
    # XLA:CPU runs top_k as its fast TopK only while the values have one user; with more it
    # sorts the whole row (32 x 49152: 300 ms instead of 17). The barrier is that one user.
    ranked = lax.optimization_barrier(ranked)
    fast, mass = _threshold(ranked, full_z, jnp.where(k <= c, k, 0), top_p)
    active = jnp.ones(k.shape, bool) if active is None else active
    # a row is answered by its candidates when its top-k is among them, or when top-k is
    # off and the candidates' mass already reaches top_p (the nucleus ends inside them)
    answered = (k > 0) & (k <= c) | (k == 0) & ((top_p >= 1.0) | (mass >= top_p))
    return lax.cond(
        jnp.any(active & ~answered),
        lambda: _bisected_threshold(logits, k, top_p),
        lambda: fast,
    )


def apply_top_k_top_p(
    logits: jax.Array,  # f32[R, V] already divided by temperature
    top_k: jax.Array,  # i32[R] 0 = off
    top_p: jax.Array,  # f32[R] 1 = off
    active: jax.Array | None = None,  # bool[R] rows that sample (greedy rows: any answer)
    candidates: int | None = None,  # static; tests make it small to reach the fallback
) -> jax.Array:  # f32[R, V]
    """Masks to -inf every token outside the top k and outside the minimal top-p nucleus."""
    threshold = filter_threshold(logits, top_k, top_p, active, candidates)
    return jnp.where(logits < threshold, -jnp.inf, logits)
