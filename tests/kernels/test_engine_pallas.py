"""The whole engine with attention_backend="pallas" (the TPU kernel, interpreted on CPU) makes
the same greedy tokens as with "xla" on the tiny random model: chunked prefill, mixed
prefill+decode steps and decode-only steps all pass through the kernel."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.engine.attention_policy import resolve_attention_backend

# Small buckets keep the interpreted kernel cheap; a 24-token budget splits the 30-token
# prompt into chunks, so steps mix a prefill chunk with other requests' decodes.
ENGINE = dict(
    max_model_len=64,
    max_num_batched_tokens=24,
    max_num_seqs=4,
    enable_warmup=False,
    show_progress=False,
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": list(range(100 + n, 100 + 2 * n))} for n in (30, 7, 1, 17)]


def _generate(model_dir, backend: str) -> list[list[int]]:
    with LLM(str(model_dir), attention_backend=backend, **ENGINE) as llm:
        assert llm._engine().core.runner.attention_backend == backend
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_pallas_engine_matches_xla_greedy(tiny_model_dir):
    xla = _generate(tiny_model_dir, "xla")
    pallas = _generate(tiny_model_dir, "pallas")
    assert all(len(t) == GREEDY.max_tokens for t in xla)
    assert pallas == xla


@pytest.mark.parametrize(
    "platform,want", [("cpu", "xla"), ("tpu", "pallas"), ("gpu", "pallas"), ("cuda", "pallas")]
)
def test_auto_backend_per_platform(platform, want):
    assert resolve_attention_backend("auto", platform) == want
    assert resolve_attention_backend("xla", platform) == "xla"  # explicit choice wins


def test_auto_backend_on_this_host_is_xla_on_cpu():
    assert jax.default_backend() == "cpu"  # CI has no accelerator
    assert resolve_attention_backend("auto") == "xla"


def _spec(head_dim: int, num_q_heads: int = 4, num_kv_heads: int = 2):
    from jaxserve.model.spec import ModelSpec

    return ModelSpec(
        architecture="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=4,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )


@pytest.mark.parametrize("platform", ["gpu", "cuda"])
def test_cuda_refusal_falls_back_to_xla_with_one_warning(platform, caplog):
    # The CUDA kernel needs head_dim % 64 == 0: auto keeps such a model on xla and says why.
    kw = dict(spec=_spec(head_dim=96), dtype=jnp.bfloat16, block_size=16)
    with caplog.at_level(logging.WARNING, logger="jaxserve.engine.core"):
        assert resolve_attention_backend("auto", platform, **kw) == "xla"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "head_dim=96 must be a multiple of 64" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxserve.engine.core"):
        ok = dict(kw, spec=_spec(head_dim=128))
        assert resolve_attention_backend("auto", platform, **ok) == "pallas"
    assert not caplog.records  # a configuration the kernel takes stays quiet


@pytest.mark.parametrize(
    "platform,kw,match",
    [
        ("gpu", dict(spec=_spec(96), dtype=jnp.bfloat16, block_size=16), "head_dim=96"),
        ("cuda", dict(spec=_spec(128), dtype=jnp.float32, block_size=128), "shared memory"),
        ("cuda", dict(spec=_spec(64), dtype=jnp.bfloat16, block_size=4), "block_size=4"),
        ("tpu", dict(spec=_spec(128), dtype=jnp.float16, block_size=16), "float16"),
        ("cpu", dict(spec=_spec(64), dtype=jnp.bfloat16, block_size=8), "block_size=8"),
    ],
)
def test_explicit_pallas_with_a_refused_config_raises_at_start(platform, kw, match):
    # Named at engine start (the engine calls this before building the runner), not inside
    # the first step's trace. On CPU "pallas" means the TPU kernel, interpreted.
    with pytest.raises(ValueError, match=f"attention_backend='pallas'.*{match}"):
        resolve_attention_backend("pallas", platform, **kw)


def test_explicit_pallas_on_a_config_the_kernel_takes():
    kw = dict(spec=_spec(64, 9, 3), dtype=jnp.bfloat16, block_size=16)  # SmolLM2-135M's heads
    for platform in ("gpu", "tpu", "cpu"):
        assert resolve_attention_backend("pallas", platform, **kw) == "pallas"
    assert resolve_attention_backend("auto", "cpu", **kw) == "xla"  # CPU never checks a kernel


def test_pallas_step_updates_cache_in_place():
    # The KV update stays the donated XLA scatter under the pallas backend: the step's output
    # cache is the input buffer and no layer-sized copy appears (kernel reads the flat view).
    from jaxserve.model import layers, llama
    from jaxserve.model.attention import AttentionMetadata

    spec = _spec(head_dim=16)
    cache = llama.init_kv_cache(spec, 512, 8)  # 4 MiB; one layer is 1 MiB
    md = AttentionMetadata(
        slot_mapping=jnp.arange(8, 12, dtype=jnp.int32),
        token_req_idx=jnp.zeros((4,), jnp.int32),
        block_tables=jnp.asarray([[1, 0]], jnp.int32),
        kv_lens=jnp.asarray([4], jnp.int32),
        cu_q_lens=jnp.asarray([0, 4], jnp.int32),
    )

    def step(params, ids, pos, md, kv_cache):
        pallas = layers.make_attention("pallas", interpret=True)
        return llama.forward(params, spec, ids, pos, md, kv_cache, attention=pallas)

    params = llama.init_params(spec, jax.random.key(0))
    ids = jnp.zeros((4,), jnp.int32)
    compiled = jax.jit(step, donate_argnames="kv_cache").lower(
        params, ids, jnp.arange(4), md, cache
    )
    mem = compiled.compile().memory_analysis()
    cache_bytes = cache.k.nbytes + cache.v.nbytes
    assert mem.alias_size_in_bytes == cache_bytes
    assert mem.temp_size_in_bytes < cache_bytes // (4 * spec.num_layers)


@pytest.mark.parametrize("backend, want", [("auto", "xla"), ("pallas", None)])
def test_engine_start_checks_the_kernel_on_cuda(tiny_model_dir, monkeypatch, backend, want):
    # The tiny model's head_dim 16 is not a multiple of 64, which the CUDA kernel needs: an
    # engine "on a GPU" must pick xla under auto and refuse pallas at start, naming head_dim.
    # (kv_cache_memory: the GPU memory-stats sizing path would read this CPU's stats.)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    args = dict(ENGINE, kv_cache_memory=1 << 20, attention_backend=backend)
    if want is None:
        with pytest.raises(ValueError, match="head_dim"):
            LLM(str(tiny_model_dir), **args)
        return
    with LLM(str(tiny_model_dir), **args) as llm:
        assert llm._engine().core.runner.attention_backend == want
