"""prompt_logprobs against transformers on a tiny random model: chunked prefill, preemption
and n > 1 give the same numbers, and the prompt's own token is always in its entry."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams

ENGINE = dict(
    max_model_len=256,
    max_num_batched_tokens=32,  # a 90-token prompt runs in 3 chunks
    max_num_seqs=8,
    enable_warmup=False,
    show_progress=False,
)
PROMPT = {"prompt_token_ids": [int(t) for t in np.random.default_rng(0).integers(50, 4000, 90)]}
TOP = 5


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with LLM(str(tiny_model_dir), **ENGINE) as llm:
        yield llm


@pytest.fixture(scope="module")
def hf_logprobs(tiny_model_dir):
    import torch
    import transformers as tf

    model = tf.LlamaForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT["prompt_token_ids"]])).logits[0]
    return torch.log_softmax(logits, dim=-1).numpy()  # row p predicts token p + 1


def _check(prompt_logprobs, hf):
    ids = PROMPT["prompt_token_ids"]
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    for p in range(1, len(ids)):
        entry, want = prompt_logprobs[p], hf[p - 1]
        assert ids[p] in entry
        # Measured: at most 6.7e-6 apart (float32 logits summed in another order); 1e-4 is ~15x
        assert abs(entry[ids[p]].logprob - want[ids[p]]) < 1e-4
        # the rank up to near-ties: logits within the logprob tolerance may order either way
        v = want[ids[p]]
        lo, hi = (1 + int(np.sum(want > v + d)) for d in (1e-4, -1e-4))
        assert lo <= entry[ids[p]].rank <= hi
        top = sorted((t for t in entry if entry[t].rank <= TOP), key=lambda t: entry[t].rank)
        np.testing.assert_array_equal(top, np.argsort(-want, kind="stable")[:TOP])


def test_matches_transformers_over_chunks(llm, hf_logprobs):
    params = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=TOP)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    _check(out.prompt_logprobs, hf_logprobs)
    # the same prompt again (its blocks cached): still every position computed
    again = llm.generate([PROMPT], params, use_tqdm=False)[0]
    assert again.prompt_logprobs == out.prompt_logprobs
    without = params.with_updates(prompt_logprobs=None)
    assert llm.generate([PROMPT], without, use_tqdm=False)[0].prompt_logprobs is None


def test_n_and_streaming_and_preemption_agree(tiny_model_dir, llm, hf_logprobs):
    params = SamplingParams(temperature=1.0, seed=2, max_tokens=20, n=2, prompt_logprobs=TOP)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    _check(out.prompt_logprobs, hf_logprobs)
    with LLM(str(tiny_model_dir), **{**ENGINE, "num_gpu_blocks_override": 15}) as small:
        # 4 such requests cannot all hold their 7 blocks: they preempt each other
        outs = small.generate([PROMPT] * 4, params, use_tqdm=False)
        assert small.engine.core.scheduler.num_preemptions > 0
    for o in outs:
        _check(o.prompt_logprobs, hf_logprobs)
        assert [c.token_ids for c in o.outputs] == [c.token_ids for c in out.outputs]
