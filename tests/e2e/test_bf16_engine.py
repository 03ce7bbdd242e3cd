"""The engine with dtype=bfloat16 on CPU: the tiny models' greedy tokens equal transformers
run in bfloat16 on the same weights, through the runner's whole bf16 path (weights in storage
form, bf16 x bf16 dots with f32 accumulation, the KV cache in f32 by default on CPU)."""

from __future__ import annotations

import random

import jax.numpy as jnp
import pytest

from jaxserve import LLM, SamplingParams
from tests.model.tiny_hf import write_tiny_hf

torch = pytest.importorskip("torch")

ENGINE = dict(
    dtype="bfloat16",
    max_model_len=128,
    max_num_batched_tokens=64,
    max_num_seqs=8,
    enable_warmup=False,
    show_progress=False,
)
NEW_TOKENS = 32


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49152) for _ in range(rng.randint(3, 40))] for _ in range(4)]


@pytest.fixture(scope="module", params=["llama_tied", "qwen2_untied"])
def model_dir(request, tiny_model_dir, tmp_path_factory):
    if request.param == "llama_tied":
        return tiny_model_dir
    return write_tiny_hf(tmp_path_factory.mktemp("qwen2"), "Qwen2ForCausalLM", 2, tie=False)


def test_greedy_matches_transformers_bf16(model_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()
    prompts = _prompts(seed=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    with LLM(str(model_dir), **ENGINE) as llm:
        runner = llm._engine().core.runner
        assert runner.kv_cache_dtype == jnp.float32  # kv_cache_dtype auto on CPU
        assert runner.params.layers.wq.dtype == jnp.uint16  # bf16 bits (storage form)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            ref = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
            )
        assert out.outputs[0].token_ids == ref[0, len(prompt) :].tolist(), prompt


def test_kv_cache_dtype_bfloat16_is_honoured(tiny_model_dir):
    with LLM(str(tiny_model_dir), kv_cache_dtype="bfloat16", **ENGINE) as llm:
        runner = llm._engine().core.runner
        assert runner.kv_cache_dtype == jnp.bfloat16 and runner.kv_cache.k.dtype == jnp.bfloat16


def test_kv_cache_dtype_is_validated():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM("smollm2-135m", kv_cache_dtype="float64")
