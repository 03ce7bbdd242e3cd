"""Test helpers: tiny random HF models and a jitted single-request step over a paged cache."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.model import llama
from jaxserve.model.attention import AttentionMetadata
from jaxserve.model.spec import ModelSpec

BLOCK_SIZE = 4
NUM_BLOCKS = 16  # block 0 is the null block; a request uses blocks 1..12


def tiny_spec(**overrides: object) -> ModelSpec:
    """A small random-weights Llama ModelSpec (4 layers, 4 q / 2 kv heads of 16); tests
    override only the fields they are about."""
    fields: dict[str, object] = dict(
        architecture="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=4,
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    fields.update(overrides)
    return ModelSpec(**fields)  # type: ignore[arg-type]


def tiny_hf_model(arch: str):
    """A 2-layer random transformers model of the given family (float32, eval mode)."""
    import torch
    import transformers as tf

    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=0.2,  # large enough that greedy argmaxes are not near-ties
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    if arch == "llama3":
        scaling = dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        )
        config = tf.LlamaConfig(**common, rope_scaling=scaling, rope_theta=5000.0)
        cls = tf.LlamaForCausalLM
    elif arch == "llama_tied":
        config = tf.LlamaConfig(**common, tie_word_embeddings=True, rope_theta=100000.0)
        cls = tf.LlamaForCausalLM
    elif arch == "mistral":
        config = tf.MistralConfig(**common, sliding_window=4096)
        cls = tf.MistralForCausalLM
    elif arch == "qwen2":
        config = tf.Qwen2Config(**common)
        cls = tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        config = tf.Qwen3Config(**common, head_dim=32)
        cls = tf.Qwen3ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    model = cls(config).float().eval()
    if arch == "qwen3":  # norms init to ones; perturb so q/k norm weights are exercised
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    return model


def single_request_md(start: int, n: int, num_blocks_used: int) -> AttentionMetadata:
    """Metadata for one request whose tokens [start, start + n) are in this step."""
    table = np.arange(1, num_blocks_used + 1, dtype=np.int32)  # blocks 1..N, in order
    pos = np.arange(start, start + n)
    slots = table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
    return AttentionMetadata(
        slot_mapping=jnp.asarray(slots, jnp.int32),
        token_req_idx=jnp.zeros((n,), jnp.int32),
        block_tables=jnp.asarray(table[None, :]),
        kv_lens=jnp.asarray([start + n], jnp.int32),
        cu_q_lens=jnp.asarray([0, n], jnp.int32),
    )


@functools.partial(jax.jit, donate_argnames="kv_cache")
def step(params, spec, input_ids, positions, md, kv_cache):
    hidden, kv_cache = llama.forward(params, spec, input_ids, positions, md, kv_cache)
    return llama.compute_logits(params, spec, hidden), kv_cache


def run_tokens(params, spec, ids, start, kv_cache, num_blocks_used=12):
    """Runs tokens `ids` at positions start.. for one request; returns (f32[n, V], cache)."""
    n = len(ids)
    md = single_request_md(start, n, num_blocks_used)
    pos = jnp.arange(start, start + n, dtype=jnp.int32)
    logits, kv_cache = step(params, spec, jnp.asarray(ids, jnp.int32), pos, md, kv_cache)
    return np.asarray(logits), kv_cache


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def tree_equal(a, b) -> bool:
    """Same structure, dtypes and bits."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb, strict=True)
    )
