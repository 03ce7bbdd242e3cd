"""forward's own contracts: the KV cache is updated in place under donation; backends."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.model import layers, llama
from jaxserve.model.attention import AttentionMetadata

from .helpers import single_request_md, tiny_spec

SPEC = tiny_spec()


def _step(params, ids, pos, md, kv_cache):
    hidden, kv_cache = llama.forward(params, SPEC, ids, pos, md, kv_cache)
    return hidden, kv_cache


def test_donated_cache_is_updated_in_place():
    # 4 layers x 512 blocks x 4 x 2 x 16 x 4 B x (k, v) = 2 MiB of cache, then 4x that
    params = llama.init_params(SPEC, jax.random.key(0))
    ids = jnp.zeros((4,), jnp.int32)
    pos = jnp.arange(4, dtype=jnp.int32)
    md = single_request_md(0, 4, 2)
    temps = []
    for num_blocks in (512, 2048):
        cache = llama.init_kv_cache(SPEC, num_blocks, 4)
        step = jax.jit(_step, donate_argnames="kv_cache")
        mem = step.lower(params, ids, pos, md, cache).compile().memory_analysis()
        assert mem.alias_size_in_bytes == cache.k.nbytes + cache.v.nbytes  # the input buffer
        temps.append(mem.temp_size_in_bytes)
    # no copy of the cache (or of a layer of it) may appear as a temporary: the temporaries
    # (the attention's tiles, the activations) do not grow with the cache
    assert temps[0] == temps[1], temps


def test_cache_receives_this_steps_kv_in_every_layer():
    cache = llama.init_kv_cache(SPEC, 8, 4)
    params = llama.init_params(SPEC, jax.random.key(0))
    md = single_request_md(0, 3, 2)  # slots 4, 5, 6 (block 1)
    _, cache = _step(params, jnp.array([1, 2, 3]), jnp.arange(3), md, cache)
    for kv in (cache.k, cache.v):
        assert bool(jnp.all(jnp.any(kv[:, 1, :3] != 0, axis=(-1, -2))))  # written
        assert bool(jnp.all(kv[:, 1, 3] == 0)) and bool(jnp.all(kv[:, 2:] == 0))  # untouched


def test_pallas_backend_matches_xla_and_unknown_backend_rejected():
    # The Pallas path (the TPU kernel, interpreted on CPU) inside forward's layer scan with the
    # flat multi-layer cache view: same hidden states and same cache as xla. Block size 8: the
    # TPU kernel needs whole (8 x 128) f32 tiles per page.
    params = llama.init_params(SPEC, jax.random.key(0))
    md = AttentionMetadata(
        slot_mapping=jnp.arange(8, 13, dtype=jnp.int32),  # 5 tokens into block 1
        token_req_idx=jnp.zeros((5,), jnp.int32),
        block_tables=jnp.asarray([[1, 0]], jnp.int32),
        kv_lens=jnp.asarray([5], jnp.int32),
        cu_q_lens=jnp.asarray([0, 5], jnp.int32),
    )
    args = (params, SPEC, jnp.arange(1, 6), jnp.arange(5), md)
    want, want_cache = llama.forward(*args, llama.init_kv_cache(SPEC, 4, 8))
    pallas = layers.make_attention("pallas", interpret=True)
    got, got_cache = llama.forward(*args, llama.init_kv_cache(SPEC, 4, 8), attention=pallas)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    # layer 0's K is computed before any attention; later layers' K inherit float noise
    np.testing.assert_array_equal(got_cache.k[0], want_cache.k[0])
    np.testing.assert_allclose(got_cache.v, want_cache.v, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="attention_backend"):
        layers.make_attention("flash")
