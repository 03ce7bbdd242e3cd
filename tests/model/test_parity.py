"""Parity with transformers (torch, CPU, float32) on tiny random models of every family."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.model import llama
from jaxserve.model.loader import load_model

from .helpers import BLOCK_SIZE, NUM_BLOCKS, rel_err, run_tokens, tiny_hf_model

torch = pytest.importorskip("torch")

ARCHS = ["llama3", "llama_tied", "mistral", "qwen2", "qwen3"]
PROMPT = [5, 17, 200, 3, 99, 42, 42, 7, 128, 255, 1, 64]  # 12 tokens: 3 blocks of 4


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    """(HF model, our LoadedModel) for one family, loaded from saved safetensors."""
    hf = tiny_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return hf, load_model(str(path), "float32")


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def test_spec_flags(pair):
    hf, m = pair
    arch = hf.config.model_type
    assert m.spec.qkv_bias == (arch == "qwen2")
    assert m.spec.qk_norm == (arch == "qwen3")
    assert m.spec.tie_word_embeddings == (m.params.lm_head is None)
    assert m.tokenizer is None  # no tokenizer files were saved


def test_prefill_logits_match(pair):
    hf, m = pair
    cache = llama.init_kv_cache(m.spec, NUM_BLOCKS, BLOCK_SIZE)
    ours, _ = run_tokens(m.params, m.spec, PROMPT, 0, cache)
    assert rel_err(ours, _hf_logits(hf, PROMPT)) <= 1e-4


def test_chunked_prefill_matches_one_chunk(pair):
    _, m = pair
    cache = llama.init_kv_cache(m.spec, NUM_BLOCKS, BLOCK_SIZE)
    whole, _ = run_tokens(m.params, m.spec, PROMPT, 0, cache)
    cache = llama.init_kv_cache(m.spec, NUM_BLOCKS, BLOCK_SIZE)
    first, cache = run_tokens(m.params, m.spec, PROMPT[:5], 0, cache)  # splits a block
    second, _ = run_tokens(m.params, m.spec, PROMPT[5:], 5, cache)
    np.testing.assert_allclose(np.concatenate([first, second]), whole, rtol=1e-5, atol=1e-5)


def test_greedy_matches_generate(pair):
    hf, m = pair
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor([PROMPT]), max_new_tokens=32, min_new_tokens=32, do_sample=False
        )[0, len(PROMPT) :].tolist()
    cache = llama.init_kv_cache(m.spec, NUM_BLOCKS, BLOCK_SIZE)
    logits, cache = run_tokens(m.params, m.spec, PROMPT, 0, cache)
    got = [int(np.argmax(logits[-1]))]
    for pos in range(len(PROMPT), len(PROMPT) + 31):
        logits, cache = run_tokens(m.params, m.spec, [got[-1]], pos, cache)
        got.append(int(np.argmax(logits[-1])))
    assert got == expected
