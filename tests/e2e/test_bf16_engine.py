"""The engine with dtype=bfloat16 on CPU: the runner holds the weights in storage form and the
KV cache in the dtype kv_cache_dtype names (auto: float32 on CPU). Parity lives in
tests/model/test_bf16.py (tiny models vs transformers bf16) and tests/e2e/test_smollm2.py (the
default model vs transformers f32)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from jaxserve import LLM, SamplingParams

ENGINE = dict(
    dtype="bfloat16",
    max_model_len=64,
    max_num_batched_tokens=16,
    max_num_seqs=2,
    enable_warmup=False,
    show_progress=False,
)


@pytest.mark.parametrize("kv", ["auto", "bfloat16"])
def test_kv_cache_dtype(tiny_model_dir, kv):
    with LLM(str(tiny_model_dir), kv_cache_dtype=kv, **ENGINE) as llm:
        runner = llm._engine().core.runner
        want = jnp.bfloat16  # auto: the weights' dtype
        assert runner.kv_cache_dtype == want
        # on CPU a bf16 cache is held as its uint16 bits (attention.kv_storage_dtype)
        stored = jnp.uint16 if want == jnp.bfloat16 else want
        assert runner.kv_cache.k.dtype == stored and runner.kv_cache.v.dtype == stored
        assert runner.params.layers.wq.dtype == jnp.uint16  # bf16 bits (storage form)
        assert runner.params.lm_head.dtype == jnp.bfloat16  # the tied head, untied
        out = llm.generate([{"prompt_token_ids": [101, 102, 103]}], SamplingParams(max_tokens=2))
        assert len(out[0].outputs[0].token_ids) == 2


def test_kv_cache_dtype_is_validated():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM("smollm2-135m", kv_cache_dtype="float64")
