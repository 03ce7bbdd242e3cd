"""load_format="dummy": random weights of a preset's or a config.json's shape, made on the
device; such a model has no tokenizer and takes token-id prompts (scripts/device_check.py)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.config import EngineArgs
from jaxserve.model import presets, sharding
from jaxserve.model.dummy import dummy_params, dummy_spec
from jaxserve.model.llama import init_params
from jaxserve.model.loader import load_model, load_tokenizer

ENGINE = dict(
    load_format="dummy",
    max_model_len=32,
    max_num_seqs=2,
    max_num_batched_tokens=16,
    enable_warmup=False,
    show_progress=False,
)
PROMPTS = [{"prompt_token_ids": [5, 17, 300, 2]}, {"prompt_token_ids": [400, 1, 9]}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=1)


def _generate(model: str) -> list:
    with LLM(model, **ENGINE) as llm:
        return llm.generate(PROMPTS, GREEDY, use_tqdm=False)


def test_tiny_preset_generates_and_a_config_json_alone_is_the_same_model(tmp_path):
    outs = _generate("dummy:tiny")
    vocab = presets.PRESETS["tiny"]["vocab_size"]
    for o in outs:
        c = o.outputs[0]
        assert len(c.token_ids) == GREEDY.max_tokens and all(0 <= t < vocab for t in c.token_ids)
        assert c.text == ""  # no tokenizer: token ids only
        # random weights, not zeros: the chosen token is far likelier than uniform
        assert all(
            max(p.values(), key=lambda lp: lp.logprob).logprob > -np.log(vocab) + 0.5
            for p in c.logprobs
        )
    # the same shape from a config.json alone (no safetensors) is the same model: same spec,
    # same weights (fixed seed), no tokenizer
    (tmp_path / "config.json").write_text(json.dumps(presets.PRESETS["tiny"]))
    from_dir = load_model(str(tmp_path), "float32", load_format="dummy")
    from_preset = load_model("dummy:tiny", "float32", load_format="dummy")
    assert from_dir.spec == from_preset.spec and from_dir.tokenizer is None
    for a, b in zip(
        jax.tree.leaves(from_dir.params), jax.tree.leaves(from_preset.params), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_params_are_made_in_the_target_dtype_and_sharding():
    # (one compile: the single-device path is the engine test's; jit compiles of the random
    # init cost seconds on CPU)
    spec = dummy_spec("dummy:tiny")
    mesh = sharding.make_mesh(1)
    placed = dummy_params(spec, jnp.bfloat16, mesh=mesh)
    leaves = jax.tree.leaves(placed)
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
    want = sharding.param_shardings(spec, mesh)
    assert jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding == s, placed, want)) == [
        True
    ] * len(leaves)
    assert float(jnp.std(placed.layers.wq.astype(jnp.float32))) == pytest.approx(0.02, rel=0.1)
    # the runner's placement keeps them as they are (no copy)
    same = sharding.place_params(spec, placed, mesh)
    assert all(a is b for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(placed), strict=True))


def test_llama3_8b_preset_has_llama_3_1_8b_shapes():
    spec = dummy_spec("dummy:llama3-8b")
    assert (spec.hidden_size, spec.intermediate_size, spec.num_layers) == (4096, 14336, 32)
    assert (spec.num_q_heads, spec.num_kv_heads, spec.head_dim) == (32, 8, 128)
    assert spec.vocab_size == 128256 and not spec.tie_word_embeddings
    assert spec.rope_scaling is not None and spec.rope_scaling.rope_type == "llama3"
    # 8.03e9 parameters, 16 GB in bf16 (shapes only: nothing is allocated)
    shapes = jax.eval_shape(lambda k: init_params(spec, k, jnp.bfloat16), jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == 8_030_261_248


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(model="dummy:nope", load_format="dummy"), r"model='dummy:nope'.*known.*dummy:tiny"),
        (dict(model="dummy:tiny", load_format="pt"), r"load_format must be auto\|dummy.*'pt'"),
        (dict(model="dummy:tiny"), r"model='dummy:tiny' is a shape preset.*load_format='dummy'"),
    ],
)
def test_bad_preset_or_load_format_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs(**kwargs)
    with pytest.raises(ValueError, match=match):
        LLM(**kwargs, show_progress=False)


def test_loader_refusals_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="load_format must be auto|dummy"):
        load_model("dummy:tiny", load_format="safetensors")
    with pytest.raises(FileNotFoundError, match=r"load_format='dummy'.*config.json"):
        load_model(str(tmp_path), load_format="dummy")  # no config.json to take the shape of
    with pytest.raises(ValueError, match="model='dummy:nope'"):
        load_tokenizer("dummy:nope")
    assert load_tokenizer("dummy:tiny") is None


def test_tokenizerless_engine_refuses_what_needs_text():
    with LLM("dummy:tiny", **ENGINE) as llm:
        with pytest.raises(ValueError, match="a text prompt needs a tokenizer"):
            llm.generate("hello", use_tqdm=False)
        with pytest.raises(ValueError, match="stop needs a tokenizer"):
            llm.generate(PROMPTS[:1], SamplingParams(stop=["x"]), use_tqdm=False)
        with pytest.raises(ValueError, match="bad_words needs a tokenizer"):
            llm.generate(PROMPTS[:1], SamplingParams(bad_words=["x"]), use_tqdm=False)
        with pytest.raises(ValueError, match="messages need a tokenizer"):
            llm.chat([{"role": "user", "content": "hi"}], use_tqdm=False)
