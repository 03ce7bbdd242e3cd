"""The constrained-decoding token bitmask, applied to logits inside the jitted sampler.

The host (jaxserve/structured_output/manager.py) fills `u32[R, ceil(V/32)]` as llguidance
writes it: bit j (little-endian) of word w allows token 32 * w + j. Here disallowed tokens get
-inf. Static shapes; behind lax.cond, so a batch with no constrained row runs the identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Bits per bitmask word.
BITS_PER_WORD = 32


def unpack_token_bitmask(
    bitmask: jax.Array,  # u32[R, W], W >= ceil(V / 32)
    vocab_size: int,
) -> jax.Array:  # bool[R, V] True = allowed
    """One bool per token: bit (v % 32) of word v // 32 (bits past vocab_size are dropped)."""
    r, w = bitmask.shape
    if w * BITS_PER_WORD < vocab_size:
        raise ValueError(
            f"a bitmask of {w} words per row covers {w * BITS_PER_WORD} tokens, "
            f"fewer than vocab_size={vocab_size}"
        )
    shifts = jnp.arange(BITS_PER_WORD, dtype=jnp.uint32)
    bits = (bitmask.astype(jnp.uint32)[:, :, None] >> shifts) & jnp.uint32(1)  # [R, W, 32]
    return bits.reshape(r, w * BITS_PER_WORD)[:, :vocab_size].astype(jnp.bool_)


def apply_token_bitmask(
    logits: jax.Array,  # f32[R, V] (any float dtype)
    bitmask: jax.Array,  # u32[R, W], W >= ceil(V / 32)
    has_mask: jax.Array,  # bool[R] which rows are constrained; the others are left alone
) -> jax.Array:  # [R, V] logits with disallowed tokens of constrained rows at -inf
    """Set the logits of tokens a constrained row's bitmask disallows to -inf.

    Rows with has_mask False keep their logits whatever their bitmask holds. When no row is
    constrained the cond takes the identity branch: no unpacking, no select.
    """

    has_mask = has_mask.astype(jnp.bool_)  # an int mask would make ~ a bitwise not

    def masked(logits: jax.Array) -> jax.Array:
        allowed = unpack_token_bitmask(bitmask, logits.shape[-1]) | ~has_mask[:, None]
        return jnp.where(allowed, logits, jnp.array(-jnp.inf, logits.dtype))

    return lax.cond(jnp.any(has_mask), masked, lambda x: x, logits)
