"""Loader errors, sharded safetensors, bf16 safetensors, orbax round trip, spec parsing."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.model import llama
from jaxserve.model.checkpoint import load_checkpoint, save_checkpoint
from jaxserve.model.gguf_loader import unpermute_rope_rows
from jaxserve.model.loader import load_model
from jaxserve.model.spec import ModelSpec

from .helpers import tiny_hf_model, tree_equal

torch = pytest.importorskip("torch")


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(str(tmp_path))


def test_missing_path_names_model_field_and_builtins(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="model=.*nope.*smollm2-135m"):
        load_model(str(missing))


def test_sharded_and_bf16_safetensors(tmp_path):
    hf = tiny_hf_model("qwen2")
    hf.save_pretrained(tmp_path / "one", safe_serialization=True)
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    one = load_model(str(tmp_path / "one"), "float32")
    sharded = load_model(str(tmp_path / "sharded"), "float32")
    assert tree_equal(one.params, sharded.params)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    bf16 = load_model(str(tmp_path / "bf16"), "bfloat16")
    assert bf16.params.embed.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(bf16.params.embed), np.asarray(one.params.embed.astype(jnp.bfloat16))
    )


def test_orbax_round_trip_is_bit_identical(tmp_path):
    spec = ModelSpec.from_hf_config(tiny_hf_model("qwen3").config.to_dict())
    params = llama.init_params(spec, jax.random.key(1), jnp.float32)
    save_checkpoint(tmp_path / "ckpt", params, spec)
    spec2, params2 = load_checkpoint(tmp_path / "ckpt")
    assert spec2 == spec and hash(spec2) == hash(spec)
    assert tree_equal(params, params2)
    loaded = load_model(str(tmp_path / "ckpt"), "float32")  # the dispatch finds it too
    assert tree_equal(params, loaded.params) and loaded.tokenizer is None


def test_hf_config_variants():
    base = dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    # transformers 4.x layout: rope_theta + rope_scaling at top level; eos as a list
    spec = ModelSpec.from_hf_config(
        {
            **base,
            "rope_theta": 5e5,
            "rope_scaling": {"type": "linear", "factor": 2.0},
            "eos_token_id": [7, 9],
            "bos_token_id": 1,
        }
    )
    assert spec.rope_theta == 5e5 and spec.rope_scaling.rope_type == "linear"
    assert spec.eos_token_id == 7 and spec.eos_token_ids == (7, 9)
    assert spec.num_kv_heads == 2 and spec.head_dim == 4
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="yarn"):
        ModelSpec.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads, head_dim 8

    def permute(x, n_head):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        return (
            x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:])
            .swapaxes(1, 2)
            .reshape(x.shape)
        )

    np.testing.assert_array_equal(unpermute_rope_rows(permute(w, 2), 2), w)
