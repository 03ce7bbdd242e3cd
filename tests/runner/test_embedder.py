"""Embedder: chunked mean-pooled final hidden states match transformers and the one-shot forward,
whatever the prompt length relative to the chunk; warmup compiles every program it runs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.model.attention import AttentionMetadata, KVCache
from jaxserve.model.llama import forward
from jaxserve.model.loader import load_model, resolve_dtype
from jaxserve.runner.compile_counter import CompileCounter
from jaxserve.runner.embedder import Embedder

CHUNK = 32
MAX_LEN = 128


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), resolve_dtype("float32"))


@pytest.fixture(scope="module")
def embedder(loaded):
    return Embedder(
        loaded.spec,
        loaded.params,
        dtype=jnp.float32,
        block_size=16,
        max_model_len=MAX_LEN,
        chunk_size=CHUNK,
    )


@functools.partial(jax.jit, static_argnames=("spec",))
def _one_shot(params, input_ids, num_tokens, *, spec):
    """The embedding as computed before chunking (the previous runner/embedder.py): one
    forward over the whole padded prompt against a scratch cache just big enough for it."""
    t, bs = input_ids.shape[0], 16
    num_blocks = -(-t // bs)
    shape = (spec.num_layers, num_blocks + 1, bs, spec.num_kv_heads, spec.head_dim)
    kv = KVCache(k=jnp.zeros(shape, jnp.float32), v=jnp.zeros(shape, jnp.float32))
    idx = jnp.arange(t, dtype=jnp.int32)
    is_real = idx < num_tokens
    md = AttentionMetadata(
        slot_mapping=jnp.where(is_real, idx + bs, 0),
        token_req_idx=jnp.zeros(t, jnp.int32),
        block_tables=jnp.arange(1, num_blocks + 1, dtype=jnp.int32)[None, :],
        kv_lens=num_tokens.reshape(1),
        cu_q_lens=jnp.stack([jnp.int32(0), num_tokens]),
    )
    hidden, _ = forward(params, spec, input_ids, jnp.where(is_real, idx, 0), md, kv)
    mask = is_real[:, None].astype(jnp.float32)
    pooled = (hidden * mask).sum(0) / num_tokens.astype(jnp.float32)
    return pooled / jnp.linalg.norm(pooled)


def one_shot_embedding(loaded, token_ids):
    padded = np.zeros(MAX_LEN, np.int32)  # one bucket for all lengths: one compile
    padded[: len(token_ids)] = token_ids
    out = _one_shot(loaded.params, padded, np.int32(len(token_ids)), spec=loaded.spec)
    return np.asarray(out, np.float64)


def hf_embedding(model_dir, token_ids):
    import torch
    import transformers as tf

    model = tf.AutoModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([token_ids])).last_hidden_state[0]  # after the final norm
    pooled = hidden.mean(0).numpy()
    return pooled / np.linalg.norm(pooled)


def ids_of(n):
    return [(7 * i + 3) % 1000 + 10 for i in range(n)]


@pytest.mark.parametrize("n", [1, 5, 16, 17, 40, 128])
def test_matches_transformers(embedder, tiny_model_dir, n):
    got = np.asarray(embedder.embed(ids_of(n)))
    np.testing.assert_allclose(got, hf_embedding(tiny_model_dir, ids_of(n)), atol=2e-5)
    assert abs(np.linalg.norm(got) - 1.0) < 1e-5


def test_chunked_equals_one_shot(embedder, loaded):
    """1, C-1, C, C+1, several chunks, a ragged last chunk, max_model_len: every bucket."""
    lengths = [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5, MAX_LEN]
    compiles = CompileCounter()
    embedder.warmup()
    warm = compiles.count
    got = {n: np.asarray(embedder.embed(ids_of(n)), np.float64) for n in lengths}
    # buckets of 1, 2, 4 and 8 blocks: a chunk program and an allocation each, compiled once
    assert len(embedder.block_buckets) == 4 and warm <= 8
    assert compiles.count == warm  # after warmup no length compiles anything
    compiles.close()
    for n in lengths:
        want = one_shot_embedding(loaded, ids_of(n))
        # Measured: at most 1.5e-7 apart (float32 sums in another order); 1e-6 is ~6x that.
        np.testing.assert_allclose(got[n], want, rtol=0, atol=1e-6, err_msg=f"n={n}")


def test_slices_are_bounded_and_the_scratch_goes(embedder, loaded):
    n = 2 * CHUNK + 1  # bucket: 8 blocks (128 tokens), in chunks of 32
    job = embedder.start(ids_of(n))
    assert (job.num_blocks, job.chunk, job.num_slices_left) == (8, CHUNK, 3)
    assert [embedder.run_slice(job) for _ in range(2)] == [None, None]
    assert job.num_done == 2 * CHUNK and job.num_slices_left == 1
    cache = job.kv_cache
    s = loaded.spec
    assert cache.k.shape == (s.num_layers, 9, 16, s.num_kv_heads, s.head_dim)
    assert cache.k.nbytes + cache.v.nbytes == embedder.scratch_bytes(8)
    out = embedder.run_slice(job)
    assert out is not None and len(out) == s.hidden_size
    assert job.kv_cache is None and job.acc is None
    assert cache.k.is_deleted()  # donated to the last slice; nothing of it is left
    np.testing.assert_allclose(out, embedder.embed(ids_of(n)), atol=1e-7)


def test_short_prompt_runs_one_small_chunk(embedder):
    job = embedder.start(ids_of(5))
    assert (job.num_blocks, job.chunk, job.num_slices_left) == (1, 16, 1)
    assert embedder.run_slice(job) is not None


def test_interleaved_jobs_do_not_mix(embedder):
    """Two jobs' slices alternating give each its own embedding (separate scratch caches)."""
    a, b = embedder.start(ids_of(100)), embedder.start(list(range(500, 537)))
    outs = {}
    while len(outs) < 2:
        for name, job in (("a", a), ("b", b)):
            if name not in outs and (out := embedder.run_slice(job)) is not None:
                outs[name] = out
    np.testing.assert_allclose(outs["a"], embedder.embed(ids_of(100)), atol=1e-7)
    np.testing.assert_allclose(outs["b"], embedder.embed(list(range(500, 537))), atol=1e-7)


def test_rejects_bad_lengths(embedder, loaded):
    with pytest.raises(ValueError, match="token_ids"):
        embedder.embed([])
    with pytest.raises(ValueError, match="max_model_len"):
        embedder.embed([1] * (MAX_LEN + 1))
    with pytest.raises(ValueError, match="chunk_size"):
        Embedder(
            loaded.spec,
            loaded.params,
            dtype=jnp.float32,
            block_size=16,
            max_model_len=MAX_LEN,
            chunk_size=0,
        )
