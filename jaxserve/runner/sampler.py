"""Sampling on device, the runner's jitted sampler program: logits[R, V] -> one token per row.

The order is vLLM's: penalties -> logit_bias -> banned ids -> the token bitmask (structured
output, allowed_token_ids, bad_words; runner/token_bitmask.py) -> greedy rows take the argmax;
the other rows divide by temperature, filter (top-k, top-p, min-p) and draw with the Gumbel-max
trick, keyed by (seed, step) per row, so a seeded request gives the same text whatever its
batch-mates.
Logprobs, ranks and the top-N are taken from the raw model distribution (vLLM's default).
Everything is pure jnp with static shapes; the expensive parts (top-k/top-p, penalty counts,
top-N, random draws) sit behind lax.cond so a batch that needs none of them pays for none.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jaxserve.runner.token_bitmask import apply_token_bitmask
from jaxserve.runner.top_k_top_p import apply_top_k_top_p
from jaxserve.sampling_params import GREEDY_TEMPERATURE, MAX_LOGPROBS


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingMetadata:
    """Per-row sampling parameters as arrays (R = padded rows; padding rows are greedy)."""

    # f32[R] softmax temperature; <= GREEDY_TEMPERATURE means greedy
    temperature: jax.Array
    # i32[R] keep the k most likely tokens; 0 = off
    top_k: jax.Array
    # f32[R] nucleus mass in (0, 1]; 1 = off
    top_p: jax.Array
    # f32[R] drop tokens with prob < min_p * max prob; 0 = off
    min_p: jax.Array
    # f32[R] OpenAI presence penalty (output tokens only); 0 = off
    presence_penalty: jax.Array
    # f32[R] OpenAI frequency penalty (output tokens only); 0 = off
    frequency_penalty: jax.Array
    # f32[R] CTRL repetition penalty (prompt + output tokens); 1 = off
    repetition_penalty: jax.Array
    # u32[R] per-request seed
    seeds: jax.Array
    # i32[R] tokens the request has generated so far; folded into the key with the seed
    steps: jax.Array
    # i32[R, MAX_BANNED_TOKEN_IDS] ids forced to -inf (eos + stop ids while min_tokens is
    # unmet); -1 padded
    banned_token_ids: jax.Array
    # i32[R, L] the request's prompt + output ids, -1 padded (all -1 for rows without penalties)
    penalty_token_ids: jax.Array
    # i32[R] how many leading entries of penalty_token_ids are prompt tokens
    penalty_prompt_lens: jax.Array
    # i32[R] top-N logprobs wanted; -1 = no logprobs at all
    num_logprobs: jax.Array
    # i32[R, MAX_LOGIT_BIAS] token ids whose logits get logit_bias_values added; -1 padded
    logit_bias_ids: jax.Array
    # f32[R, MAX_LOGIT_BIAS] the biases
    logit_bias_values: jax.Array
    # u32[R, ceil(V/32)] allowed tokens of the rows with has_token_bitmask (bit j of word w:
    # token 32w + j); None only outside the runner (the runner always passes one)
    token_bitmask: jax.Array | None = None
    # bool[R] which rows the bitmask constrains
    has_token_bitmask: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerOutput:
    # i32[R] the sampled token of each row
    token_ids: jax.Array
    # f32[R] logprob of the sampled token under log_softmax(raw logits) (zeros when no row
    # asked for logprobs)
    logprobs: jax.Array
    # i32[R] 1-based rank of the sampled token in that distribution (zeros likewise)
    ranks: jax.Array
    # i32[R, MAX_LOGPROBS] most likely tokens, best first (zeros when no row asked for logprobs)
    top_token_ids: jax.Array
    # f32[R, MAX_LOGPROBS] their logprobs (zeros when no row asked for logprobs)
    top_logprobs: jax.Array


def _token_counts(
    token_ids: jax.Array,  # i32[R, L] -1 padded
    mask: jax.Array,  # bool[R, L] which entries count
    vocab_size: int,
) -> jax.Array:  # i32[R, V]
    """How often each vocab id occurs among the masked entries of each row (scatter-add)."""
    r, _ = token_ids.shape
    # -1 (padding) and masked-out entries go to index V, which mode="drop" discards; mapping
    # them explicitly avoids jnp's Python-style wrapping of negative indices.
    ids = jnp.where(mask & (token_ids >= 0), token_ids, vocab_size)
    rows = jnp.broadcast_to(jnp.arange(r)[:, None], ids.shape)
    return jnp.zeros((r, vocab_size), jnp.int32).at[rows, ids].add(1, mode="drop")


def apply_penalties(
    logits: jax.Array,  # f32[R, V]
    md: SamplingMetadata,
) -> jax.Array:  # f32[R, V]
    """Repetition penalty on prompt + output tokens, then presence/frequency on output ones.

    Rows without penalties come out bit-identical (x / 1, x * 1 and x - 0 are exact), so a
    row's result never depends on whether a batch-mate switched this branch on.
    """
    _, v = logits.shape
    length = md.penalty_token_ids.shape[1]
    valid = jnp.ones(md.penalty_token_ids.shape, bool)
    is_output = jnp.arange(length)[None, :] >= md.penalty_prompt_lens[:, None]
    seen = _token_counts(md.penalty_token_ids, valid, v) > 0
    output_counts = _token_counts(md.penalty_token_ids, is_output, v).astype(logits.dtype)

    rep = md.repetition_penalty[:, None]
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalized, logits)
    logits = logits - md.frequency_penalty[:, None] * output_counts
    return logits - md.presence_penalty[:, None] * (output_counts > 0).astype(logits.dtype)


def apply_banned(
    logits: jax.Array,  # f32[R, V]
    banned_token_ids: jax.Array,  # i32[R, NB] -1 padded
) -> jax.Array:  # f32[R, V]
    r, v = logits.shape
    ids = jnp.where(banned_token_ids >= 0, banned_token_ids, v)
    rows = jnp.broadcast_to(jnp.arange(r)[:, None], ids.shape)
    return logits.at[rows, ids].set(-jnp.inf, mode="drop")


def apply_logit_bias(
    logits: jax.Array,  # f32[R, V]
    ids: jax.Array,  # i32[R, NB] -1 padded
    values: jax.Array,  # f32[R, NB]
) -> jax.Array:  # f32[R, V]
    r, v = logits.shape
    ids = jnp.where(ids >= 0, ids, v)  # padding (and nothing else) lands past V: dropped
    rows = jnp.broadcast_to(jnp.arange(r)[:, None], ids.shape)
    return logits.at[rows, ids].add(values, mode="drop")


def apply_min_p(
    logits: jax.Array,  # f32[R, V] already divided by temperature
    min_p: jax.Array,  # f32[R] 0 = off
) -> jax.Array:  # f32[R, V]
    # p_i >= min_p * p_max  <=>  logit_i >= max_logit + log(min_p); log(0) = -inf keeps all
    max_logit = jnp.max(logits, axis=-1, keepdims=True)
    threshold = max_logit + jnp.log(min_p)[:, None]
    return jnp.where(logits < threshold, -jnp.inf, logits)


def _gumbel_noise(
    seeds: jax.Array,  # u32[R]
    steps: jax.Array,  # i32[R]
    vocab_size: int,
) -> jax.Array:  # f32[R, V]
    """Per-row noise from key(seed) folded with step: independent of the batch and row order."""

    def one(seed: jax.Array, step: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(seed), step)
        return jax.random.gumbel(key, (vocab_size,), jnp.float32)

    return jax.vmap(one)(seeds, steps)


def _random_sample(
    logits: jax.Array,  # f32[R, V] after penalties and bans
    md: SamplingMetadata,
) -> jax.Array:  # i32[R]
    _, v = logits.shape
    is_greedy = md.temperature <= GREEDY_TEMPERATURE
    temperature = jnp.where(is_greedy, 1.0, md.temperature)
    logits = logits / temperature[:, None]
    needs_sort = jnp.any(~is_greedy & ((md.top_k > 0) | (md.top_p < 1.0)))
    logits = lax.cond(
        needs_sort,
        lambda x: apply_top_k_top_p(x, md.top_k, md.top_p, ~is_greedy),
        lambda x: x,
        logits,
    )
    logits = apply_min_p(logits, md.min_p)
    # Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits), with no
    # normalization and no cumulative sums.
    return jnp.argmax(logits + _gumbel_noise(md.seeds, md.steps, v), axis=-1).astype(jnp.int32)


def _top_logprobs(
    raw_logprobs: jax.Array,  # f32[R, V]
) -> tuple[jax.Array, jax.Array]:  # (i32[R, MAX_LOGPROBS], f32[R, MAX_LOGPROBS])
    r, v = raw_logprobs.shape
    k = min(MAX_LOGPROBS, v)
    values, ids = lax.top_k(raw_logprobs, k)
    # a vocab smaller than MAX_LOGPROBS (tests) pads with id 0 / -inf to keep the width static
    pad = ((0, 0), (0, MAX_LOGPROBS - k))
    return (
        jnp.pad(ids.astype(jnp.int32), pad),
        jnp.pad(values, pad, constant_values=-jnp.inf),
    )


def _logprobs(
    raw_logits: jax.Array,  # f32[R, V] the model's logits, unmodified
    token_ids: jax.Array,  # i32[R] the sampled tokens
    num_logprobs: jax.Array,  # i32[R]
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    r, _ = raw_logits.shape
    raw_logprobs = jax.nn.log_softmax(raw_logits, axis=-1)
    token_logprobs = jnp.take_along_axis(raw_logprobs, token_ids[:, None], axis=-1)[:, 0]
    ranks = 1 + jnp.sum(raw_logprobs > token_logprobs[:, None], axis=-1, dtype=jnp.int32)
    top_ids, top_lps = lax.cond(
        jnp.any(num_logprobs > 0),
        _top_logprobs,
        lambda x: (
            jnp.zeros((r, MAX_LOGPROBS), jnp.int32),
            jnp.zeros((r, MAX_LOGPROBS), jnp.float32),
        ),
        raw_logprobs,
    )
    return token_logprobs, ranks, top_ids, top_lps


def _no_logprobs(
    raw_logits: jax.Array, token_ids: jax.Array, num_logprobs: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    r, _ = raw_logits.shape
    return (
        jnp.zeros((r,), jnp.float32),
        jnp.zeros((r,), jnp.int32),
        jnp.zeros((r, MAX_LOGPROBS), jnp.int32),
        jnp.zeros((r, MAX_LOGPROBS), jnp.float32),
    )


def sample(
    logits: jax.Array,  # f32[R, V] (any float dtype; computed in f32)
    md: SamplingMetadata,
) -> SamplerOutput:
    """One token per row, plus its logprob and rank and the top-N under the raw distribution."""
    logits = logits.astype(jnp.float32)
    raw_logits = logits

    needs_penalties = jnp.any(
        (md.repetition_penalty != 1.0)
        | (md.presence_penalty != 0.0)
        | (md.frequency_penalty != 0.0)
    )
    logits = lax.cond(needs_penalties, lambda x: apply_penalties(x, md), lambda x: x, logits)
    logits = lax.cond(
        jnp.any(md.logit_bias_ids >= 0),
        lambda x: apply_logit_bias(x, md.logit_bias_ids, md.logit_bias_values),
        lambda x: x,
        logits,
    )
    logits = apply_banned(logits, md.banned_token_ids)
    if md.token_bitmask is not None:
        assert md.has_token_bitmask is not None
        logits = apply_token_bitmask(logits, md.token_bitmask, md.has_token_bitmask)

    greedy_ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    is_greedy = md.temperature <= GREEDY_TEMPERATURE
    token_ids = lax.cond(
        jnp.all(is_greedy),
        lambda x: greedy_ids,
        lambda x: jnp.where(is_greedy, greedy_ids, _random_sample(x, md)),
        logits,
    )

    # NOTE: logprobs come from the raw logits (vLLM's default "raw_logprobs" mode), so they
    # describe the model, not the filters; skipped entirely when no row asked for them.
    token_logprobs, ranks, top_ids, top_lps = lax.cond(
        jnp.any(md.num_logprobs >= 0),
        _logprobs,
        _no_logprobs,
        raw_logits,
        token_ids,
        md.num_logprobs,
    )
    return SamplerOutput(
        token_ids=token_ids,
        logprobs=token_logprobs,
        ranks=ranks,
        top_token_ids=top_ids,
        top_logprobs=top_lps,
    )
