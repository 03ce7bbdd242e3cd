"""The batched LoRA delta in the forward against merged weights (W + A @ B) run without it."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.model import llama
from jaxserve.model.lora import LORA_TARGETS, LoRAStacks, stack_shapes
from tests.model.helpers import BLOCK_SIZE, NUM_BLOCKS, rel_err, single_request_md, tiny_spec

SLOTS, RANK = 3, 4


def _random_stacks(spec, key) -> LoRAStacks:
    a, b = {}, {}
    shapes = stack_shapes(spec, SLOTS, RANK)
    keys = jax.random.split(key, 2 * len(shapes))
    for i, (t, (sa, sb)) in enumerate(shapes.items()):
        a[t] = 0.3 * jax.random.normal(keys[2 * i], sa, jnp.float32)
        b[t] = 0.3 * jax.random.normal(keys[2 * i + 1], sb, jnp.float32)
    return LoRAStacks(a=a, b=b)


def _merged(params: llama.Params, stacks: LoRAStacks, slot: int) -> llama.Params:
    """Params with slot `slot`'s adapter merged into the weights (slot 0: unchanged)."""
    if slot == 0:
        return params
    s = slot - 1
    merged = {
        t: getattr(params.layers, t)
        + jnp.einsum("lir,lro->lio", stacks.a[t][:, :, s], stacks.b[t][:, s])
        for t in LORA_TARGETS
    }
    return dataclasses.replace(params, layers=dataclasses.replace(params.layers, **merged))


@functools.partial(jax.jit, static_argnames="spec")
def _logits(params, spec, ids, md, lora, slots):
    kv = llama.init_kv_cache(spec, NUM_BLOCKS, BLOCK_SIZE)
    pos = jnp.arange(ids.shape[0], dtype=jnp.int32)
    hidden, _ = llama.forward(params, spec, ids, pos, md, kv, lora=lora, lora_slots=slots)
    return llama.compute_logits(params, spec, hidden)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_each_slot_equals_its_merged_weights_and_slot0_is_the_base(qkv_bias: bool):
    spec = tiny_spec(qkv_bias=qkv_bias)
    params = llama.init_params(spec, jax.random.key(0))
    stacks = _random_stacks(spec, jax.random.key(1))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, spec.vocab_size, 10), jnp.int32)
    md = single_request_md(0, 10, 12)
    base = np.asarray(_logits(params, spec, ids, md, None, None))
    outs = []
    for slot in range(SLOTS + 1):
        slots = jnp.full((10,), slot, jnp.int32)
        got = np.asarray(_logits(params, spec, ids, md, stacks, slots))
        want = np.asarray(_logits(_merged(params, stacks, slot), spec, ids, md, None, None))
        assert rel_err(got, want) < 1e-5, slot
        outs.append(got)
    # slot 0 is the base model bit for bit (the lax.cond branch without the delta)
    np.testing.assert_array_equal(outs[0], base)
    # and the adapters change the output (the test could fail)
    assert all(rel_err(o, base) > 1e-2 for o in outs[1:])
