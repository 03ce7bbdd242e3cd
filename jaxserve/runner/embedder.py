"""Embedder: a prompt's pooled final hidden state, computed apart from the serving KV cache.

NOTE on the design: the embedding forward never touches the engine's paged KV cache. It runs
the same `forward` over a scratch cache of its own (created inside the jitted function, just
big enough for the padded prompt, freed when it returns), so an embed call can neither corrupt
a running request's KV nor take blocks from the scheduler. The prompt is padded to a power-of-
two token bucket (16 .. max_model_len), so at most log2(max_model_len / 16) + 1 programs are
ever compiled; each compiles on its first use (embeddings are not part of warmup), which costs
about one step compile per new bucket.

Pooling: mean over the prompt's tokens of the final hidden states (after the final RMSNorm,
i.e. what the LM head reads), then L2-normalized, so cosine similarity is a dot product.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.model.attention import AttentionMetadata, KVCache
from jaxserve.model.llama import forward
from jaxserve.model.spec import ModelSpec
from jaxserve.runner.step_inputs import _powers_of_two


def _embed(
    params: object,
    input_ids: jax.Array,  # i32[T] the prompt, padded with 0 to the bucket T
    num_tokens: jax.Array,  # i32[] real prompt length n <= T
    *,
    spec: ModelSpec,
    block_size: int,
    dtype: jnp.dtype,
    attention_backend: str,
) -> jax.Array:  # f32[E], unit L2 norm
    t = input_ids.shape[0]
    num_blocks = -(-t // block_size)
    # Scratch cache: block 0 is its own null block (padding writes there), blocks 1..num_blocks
    # hold the prompt in order.
    shape = (spec.num_layers, num_blocks + 1, block_size, spec.num_kv_heads, spec.head_dim)
    kv_cache = KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
    idx = jnp.arange(t, dtype=jnp.int32)
    is_real = idx < num_tokens
    md = AttentionMetadata(
        slot_mapping=jnp.where(is_real, idx + block_size, 0),
        token_req_idx=jnp.zeros(t, jnp.int32),
        block_tables=jnp.arange(1, num_blocks + 1, dtype=jnp.int32)[None, :],
        kv_lens=num_tokens.reshape(1),
        cu_q_lens=jnp.stack([jnp.int32(0), num_tokens]),
    )
    positions = jnp.where(is_real, idx, 0)
    hidden, _ = forward(
        params, spec, input_ids, positions, md, kv_cache, attention_backend=attention_backend
    )  # [T, E]
    mask = is_real[:, None].astype(jnp.float32)
    pooled = (hidden.astype(jnp.float32) * mask).sum(0) / num_tokens.astype(jnp.float32)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled), 1e-12)


class Embedder:
    """Jitted pooled embeddings over the runner's params (shared, never copied)."""

    def __init__(
        self,
        spec: ModelSpec,
        params: object,
        *,
        dtype: jnp.dtype,
        block_size: int,
        max_model_len: int,
        attention_backend: str = "xla",
    ) -> None:
        self.params = params
        self.max_model_len = max_model_len
        # token buckets: powers of two from 16 up to max_model_len
        self.token_sizes = _powers_of_two(min(16, max_model_len), max_model_len)
        self._embed_fn = jax.jit(
            functools.partial(
                _embed,
                spec=spec,
                block_size=block_size,
                dtype=dtype,
                attention_backend=attention_backend,
            )
        )

    def embed(self, token_ids: list[int]) -> list[float]:
        """The unit-norm mean-pooled final hidden state (hidden_size floats) of `token_ids`."""
        n = len(token_ids)
        if not 0 < n <= self.max_model_len:
            raise ValueError(
                f"token_ids must hold 1 to max_model_len={self.max_model_len} tokens, got {n}"
            )
        t = next(s for s in self.token_sizes if s >= n)
        input_ids = np.zeros(t, np.int32)
        input_ids[:n] = token_ids
        out = self._embed_fn(self.params, input_ids, np.int32(n))
        return np.asarray(out, dtype=np.float32).tolist()
