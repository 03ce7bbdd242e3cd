"""bfloat16 weights on CPU against transformers run in bfloat16 on the same weights.

Our bf16 path is the one the runner uses on CPU: the weights in storage form (the layer stacks
and the embedding as bf16 bit patterns, the tied head untied; llama.storage_params), every dot
bf16 x bf16 accumulated in f32, activations in f32 between the dots, the KV cache in f32 (what
kv_cache_dtype="float32" gives; the engine tests cover the bf16 cache).

Transformers rounds every activation to bf16, so its own bf16 greedy run leaves its f32 run at
the first near-tie (measured on this prompt: after 3 tokens for llama_tied, 8 for qwen2, 27
for llama3), and past that point its tokens are rounding noise. The parity asserted: wherever
transformers' bf16 and f32 runs agree, our bf16 argmax is transformers' bf16 token, at every
position (teacher-forced on transformers' bf16 sequence, which is greedy equality over that
span), and that span is most of the sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.model import llama
from jaxserve.model.loader import load_model

from .helpers import BLOCK_SIZE, run_tokens, single_request_md, tiny_hf_model

torch = pytest.importorskip("torch")

# tied head, untied head + qkv biases, qk norms: every dtype-dependent path of the model (the
# other families differ in rope scaling and sliding windows, computed in f32 either way)
ARCHS = ["llama_tied", "qwen2", "qwen3"]
PROMPT = [5, 17, 200, 3, 99, 42, 42, 7, 128, 255, 1, 64]
NEW_TOKENS = 32
NUM_BLOCKS = 16  # 15 usable blocks of 4: the prompt and its continuation


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    """(HF model in f32, our bf16 params in storage form, spec), from the same f32 file."""
    hf = tiny_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    m = load_model(str(path), "bfloat16")
    return hf, llama.storage_params(m.params, untie_head=True), m.spec


def _hf_greedy(hf, dtype) -> list[int]:
    with torch.no_grad():
        out = hf.to(dtype).generate(
            torch.tensor([PROMPT]),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    return out[0, len(PROMPT) :].tolist()


def test_storage_form(pair):
    _, params, spec = pair
    assert params.embed.dtype == jnp.uint16 and params.layers.wq.dtype == jnp.uint16
    assert params.lm_head is not None and params.lm_head.dtype == jnp.bfloat16
    assert params.lm_head.shape == (spec.hidden_size, spec.vocab_size)
    assert llama.weight_dtype(params) == jnp.bfloat16


def test_greedy_matches_transformers_bf16(pair):
    hf, params, spec = pair
    ref32 = _hf_greedy(hf, torch.float32)
    ref16 = _hf_greedy(hf, torch.bfloat16)
    hf.float()  # the fixture's model stays f32 for the next test
    span = next((i for i in range(NEW_TOKENS) if ref16[i] != ref32[i]), NEW_TOKENS)
    assert span >= 3  # measured: 3 (llama_tied), 8 (qwen2), 32 (qwen3)
    cache = llama.init_kv_cache(spec, NUM_BLOCKS, BLOCK_SIZE, jnp.float32)
    seq = PROMPT + ref16[: span - 1]
    logits, _ = run_tokens(params, spec, seq, 0, cache, num_blocks_used=NUM_BLOCKS - 1)
    ours = np.argmax(logits[len(PROMPT) - 1 :], axis=-1).tolist()
    assert ours == ref16[:span]


def test_bf16_forward_moves_no_f32_weights(pair):
    """The compiled forward converts no weight stack to f32 (what made bf16 slow on CPU)."""
    _, params, spec = pair
    cache = llama.init_kv_cache(spec, NUM_BLOCKS, BLOCK_SIZE, jnp.float32)
    ids = jnp.zeros(4, jnp.int32)
    md = single_request_md(0, 4, 1)

    def fwd(p, c):
        h, _ = llama.forward(p, spec, ids, ids, md, c)
        return llama.compute_logits(p, spec, h)

    hlo = jax.jit(fwd).lower(params, cache).compile().as_text()
    n, e, q = spec.num_layers, spec.hidden_size, spec.num_q_heads * spec.head_dim
    assert f"bf16[{n},{e},{q}]" not in hlo and f"f32[{n},{e},{q}]" not in hlo  # stacked wq
    assert f"f32[{spec.vocab_size},{e}]" not in hlo  # the embedding, as f32
