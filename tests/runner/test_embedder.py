"""Embedder: mean-pooled final hidden states match transformers, whatever the padding bucket."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.model.loader import load_model, resolve_dtype
from jaxserve.runner.embedder import Embedder


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    dtype = resolve_dtype("float32")
    loaded = load_model(str(tiny_model_dir), dtype)
    return Embedder(loaded.spec, loaded.params, dtype=dtype, block_size=16, max_model_len=128)


def hf_embedding(model_dir, token_ids):
    import torch
    import transformers as tf

    model = tf.AutoModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([token_ids])).last_hidden_state[0]  # after the final norm
    pooled = hidden.mean(0).numpy()
    return pooled / np.linalg.norm(pooled)


@pytest.mark.parametrize("n", [1, 5, 16, 17, 40, 128])
def test_matches_transformers(embedder, tiny_model_dir, n):
    ids = [(7 * i + 3) % 1000 + 10 for i in range(n)]
    got = np.asarray(embedder.embed(ids))
    np.testing.assert_allclose(got, hf_embedding(tiny_model_dir, ids), atol=2e-5)
    assert abs(np.linalg.norm(got) - 1.0) < 1e-5


def test_rejects_bad_lengths(embedder):
    with pytest.raises(ValueError, match="token_ids"):
        embedder.embed([])
    with pytest.raises(ValueError, match="max_model_len"):
        embedder.embed([1] * 129)
