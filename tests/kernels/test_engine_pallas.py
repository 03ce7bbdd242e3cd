"""The whole engine with attention_backend="pallas" (the TPU kernel, interpreted on CPU) makes
the same greedy tokens as with "xla" on the tiny random model: chunked prefill, mixed
prefill+decode steps and decode-only steps all pass through the kernel."""

from __future__ import annotations

import jax
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.engine.core import resolve_attention_backend

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
