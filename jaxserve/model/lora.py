"""Batched LoRA inside the forward: every token adds the delta of its own adapter slot.

The device holds `max_loras` adapter slots per layer and target, zero-padded to `max_lora_rank`
(`LoRAStacks`); a token's slot index 0 means "no adapter" (that slot is not stored: its delta
is zero). For one target, with S slots of rank r:

    y = x @ W  +  ((x @ A) * onehot(slot)) @ B      A: [in, S*r], B: [S*r, out]

`A` holds every slot's A side by side, so one dot computes each token's low-rank projection
for all slots; the one-hot (per token, per slot) zeroes all but the token's own, and one more
dot brings the result back. The scale (alpha/r) is folded into B on the host. Slot counts are
small (8 by default) and r is tiny next to the hidden size, so this costs two thin dots per
target and needs no sort or gather; bench/lora_kernels.py measures it against
`jax.lax.ragged_dot` over slot-sorted tokens.

The delta sits behind `lax.cond` on "some token of this step has an adapter", so a batch with
none runs the base model's dots alone. Layouts are chosen so the reshapes above are bitcasts:
A is stored [L, in, S, r] and B [L, S, r, out].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxserve.lora.adapter import LORA_TARGETS, target_dims
from jaxserve.model.layers import linear
from jaxserve.model.spec import ModelSpec


def stack_shapes(
    spec: ModelSpec, num_slots: int, rank: int
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """target -> (A shape [L, in, S, r], B shape [L, S, r, out]) of the device slots."""
    n = spec.num_layers
    out = {}
    for t in LORA_TARGETS:
        d_in, d_out = target_dims(spec, t)
        out[t] = ((n, d_in, num_slots, rank), (n, num_slots, rank, d_out))
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoRAStacks:
    """Every adapter slot of every layer: target -> array (leading num_layers axis)."""

    a: dict[str, jax.Array]  # target -> [L, in, S, r]
    b: dict[str, jax.Array]  # target -> [L, S, r, out], the adapter's scale folded in

    @property
    def num_slots(self) -> int:
        return self.b["wq"].shape[1]

    @property
    def rank(self) -> int:
        return self.b["wq"].shape[2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoRAContext:
    """What one layer needs besides its own slot weights (built once per step)."""

    onehot: jax.Array  # [T, S] in the activations' dtype: 1 where token t uses slot s + 1
    active: jax.Array  # bool[] some token of the step has an adapter


def make_context(token_slots: jax.Array, num_slots: int, dtype: jnp.dtype) -> LoRAContext:
    """token_slots: i32[T], 0 = no adapter, s in 1..num_slots = device slot s."""
    slots = jnp.arange(1, num_slots + 1, dtype=token_slots.dtype)
    onehot = (token_slots[:, None] == slots[None, :]).astype(dtype)
    return LoRAContext(onehot=onehot, active=jnp.any(token_slots > 0))


def lora_delta(
    x: jax.Array,  # [T, in]
    a: jax.Array,  # [in, S, r] one layer's slots
    b: jax.Array,  # [S, r, out]
    onehot: jax.Array,  # [T, S]
) -> jax.Array:  # [T, out]
    t = x.shape[0]
    d_in, s, r = a.shape
    xa = jnp.dot(x.astype(a.dtype), a.reshape(d_in, s * r), preferred_element_type=jnp.float32)
    xa = (xa.reshape(t, s, r) * onehot[:, :, None].astype(jnp.float32)).reshape(t, s * r)
    out = jnp.dot(xa.astype(b.dtype), b.reshape(s * r, -1), preferred_element_type=jnp.float32)
    return out.astype(x.dtype)


def project(
    x: jax.Array,  # [T, in]
    weights: dict[str, jax.Array],  # target -> [in, out] (targets that share the input x)
    lora: LoRAStacks | None,
    layer: jax.Array,  # i32[] this layer's index into the stacks
    ctx: LoRAContext | None,
) -> dict[str, jax.Array]:  # target -> f32[T, out]
    """x @ w for each target (layers.linear: f32 out), plus each token's adapter delta when
    the step has any (else exactly x @ w). Targets reading the same x (q/k/v, gate/up) share
    one lax.cond: fewer branches to compile.

    NOTE: the layer's slots are sliced out of the stacks inside the branch, not by the layer
    scan: a slice feeding a lax.cond cannot fuse into its consumer, so scanning over the
    stacks made XLA copy every layer's slots every step, adapters or not (measured: 6% of a
    step of the default model with 8 slots of rank 16).
    """
    ys = {t: linear(x, w) for t, w in weights.items()}
    if lora is None or ctx is None:
        return ys

    def with_delta() -> dict[str, jax.Array]:
        out = {}
        for t, y in ys.items():
            a = jax.lax.dynamic_index_in_dim(lora.a[t], layer, axis=0, keepdims=False)
            b = jax.lax.dynamic_index_in_dim(lora.b[t], layer, axis=0, keepdims=False)
            out[t] = y + lora_delta(x, a, b, ctx.onehot)
        return out

    return jax.lax.cond(ctx.active, with_delta, lambda: ys)


__all__ = [
    "LORA_TARGETS",
    "LoRAContext",
    "LoRAStacks",
    "lora_delta",
    "make_context",
    "project",
    "stack_shapes",
    "target_dims",
]
