"""Prompt logprobs inside the step: the logprob, rank and top-N of each prompt token that asks.

A request with SamplingParams.prompt_logprobs needs the distribution at every prompt position,
not only at its last token, so the step computes logits for those positions too. It does so
in chunks of PROMPT_LOGPROBS_CHUNK positions (lax.map), so the extra memory is one
[chunk, V] float32 block whatever the prompt length: an 8k-token prompt over a 50k vocab
costs 32 x 50k x 4 = 6.4 MB at a time, not 8k x 50k x 4 = 1.6 GB. The whole computation sits
behind lax.cond: a step where no position asks pays nothing, and no program is added.

Position p of a request predicts prompt token p + 1, so targets[t] is that token's id for the
positions that ask, else -1 (the host builds it: step_inputs.py; it reads back here: `read`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxserve.core.outputs import TokenLogprobs
from jaxserve.sampling_params import MAX_LOGPROBS

# Positions whose logits exist at once (the memory bound above).
PROMPT_LOGPROBS_CHUNK = 32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PromptLogprobsOutput:
    # f32[T] logprob of each position's target token (0 where targets is -1)
    logprobs: jax.Array
    # i32[T] its 1-based rank in the position's distribution
    ranks: jax.Array
    # i32[T, MAX_LOGPROBS] the most likely tokens at each position, best first
    top_token_ids: jax.Array
    # f32[T, MAX_LOGPROBS] their logprobs
    top_logprobs: jax.Array


def prompt_logprobs(
    hidden: jax.Array,  # [T, H] final hidden states of the step's tokens
    targets: jax.Array,  # i32[T] the token each position predicts, -1 where nobody asks
    logits_fn: Callable[[jax.Array], jax.Array],  # [C, H] -> f32[C, V] (the LM head)
) -> PromptLogprobsOutput:
    t = hidden.shape[0]
    k = MAX_LOGPROBS
    chunk = math.gcd(t, PROMPT_LOGPROBS_CHUNK)

    def compute(args: tuple[jax.Array, jax.Array]) -> PromptLogprobsOutput:
        h, tg = args
        hc = h.reshape(t // chunk, chunk, -1)
        tc = tg.reshape(t // chunk, chunk)

        def one(x: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
            lp = jax.nn.log_softmax(logits_fn(x[0]).astype(jnp.float32), axis=-1)
            target = jnp.maximum(x[1], 0)
            tok = jnp.take_along_axis(lp, target[:, None], axis=-1)[:, 0]
            rank = 1 + jnp.sum(lp > tok[:, None], axis=-1, dtype=jnp.int32)
            top_v, top_i = lax.top_k(lp, min(k, lp.shape[-1]))
            pad = ((0, 0), (0, k - top_v.shape[-1]))
            top_v = jnp.pad(top_v, pad, constant_values=-jnp.inf)
            return tok, rank, jnp.pad(top_i.astype(jnp.int32), pad), top_v

        tok, rank, top_i, top_v = lax.map(one, (hc, tc))
        return PromptLogprobsOutput(
            logprobs=tok.reshape(t),
            ranks=rank.reshape(t),
            top_token_ids=top_i.reshape(t, k),
            top_logprobs=top_v.reshape(t, k),
        )

    def skip(args: tuple[jax.Array, jax.Array]) -> PromptLogprobsOutput:
        return PromptLogprobsOutput(
            logprobs=jnp.zeros((t,), jnp.float32),
            ranks=jnp.zeros((t,), jnp.int32),
            top_token_ids=jnp.zeros((t, k), jnp.int32),
            top_logprobs=jnp.zeros((t, k), jnp.float32),
        )

    return lax.cond(jnp.any(targets >= 0), compute, skip, (hidden, targets))


def entries(
    out: PromptLogprobsOutput,  # as numpy (read back once per step)
    offset: int,
    target_ids: list[int],
    top_n: int,
) -> list[TokenLogprobs]:
    """The entries of one request's positions offset .. offset + len(target_ids) in the step."""
    return [
        TokenLogprobs(
            token_id=tid,
            logprob=float(out.logprobs[offset + i]),
            rank=int(out.ranks[offset + i]),
            top=[
                (int(a), float(b))
                for a, b in zip(
                    out.top_token_ids[offset + i, :top_n],
                    out.top_logprobs[offset + i, :top_n],
                    strict=True,
                )
            ],
        )
        for i, tid in enumerate(target_ids)
    ]
