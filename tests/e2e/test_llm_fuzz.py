"""Hypothesis over SamplingParams kwargs and prompts through LLM.generate on the tiny model:
whatever a script passes, either it generates or it is refused with a ValueError that names
the field, and the engine lives on (a normal generate works after every example)."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from jaxserve import LLM, SamplingParams

VOCAB = 49152
FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
# what a refusal may name: a SamplingParams field, or the prompt
NAMES = FIELDS | {"prompt", "prompt_token_ids"}
# Few tokens per example: the point is what reaches the engine, not long generations.
MAX_TOKENS = 3

huge_ints = st.sampled_from([2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 2**70, -(2**63)])
any_int = st.one_of(
    huge_ints, st.integers(-3, 40), huge_ints, st.integers(-(2**63), 2**63 - 1).map(np.int64)
)
any_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-1.0, 0.0, 1e-300, 1e-45, 1.0, 1e4, 1e5, 3.5e38, 1e39, math.nan, math.inf]),
    st.floats(0, 1).map(np.float32),
)
# wrong types: what a script might pass by mistake
wrong = st.sampled_from(["1", None, [1], {"a": 1}, True, b"x", 1j])
# any text Python can hold: lone surrogates and NUL included
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
good_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
INT_FIELDS = ["n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs"]
FLOATS = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty"]
FLOATS.append("repetition_penalty")
BOOLS = ["ignore_eos", "include_stop_str_in_output", "skip_special_tokens"]
# Valid values, edges included: most of each example, so most examples reach the engine.
good = {
    "n": st.integers(1, 3),
    "top_k": st.one_of(st.integers(-1, 60), st.just(2**31 - 1)),
    "seed": st.one_of(st.integers(0, 2**63 - 1), st.integers(0, 9).map(np.int64)),
    "max_tokens": st.one_of(st.none(), st.integers(1, MAX_TOKENS)),
    "min_tokens": st.integers(0, 1),
    "logprobs": st.one_of(st.none(), st.integers(0, 20)),
    "temperature": st.one_of(st.floats(0, 2), st.sampled_from([0.0, 1e-30, 1e4])),
    "top_p": st.one_of(st.floats(1e-6, 1), st.just(1.0)),
    "min_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.one_of(st.floats(0.01, 10), st.just(1e4)),
    "stop": st.one_of(good_text, st.lists(good_text, max_size=4)),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=5),
    **{b: st.booleans() for b in BOOLS},
}
# What a careless script passes: out of range, huge, NaN, wrong types, surrogates.
bad = {
    **{f: st.one_of(any_int, wrong) for f in INT_FIELDS},
    **{f: st.one_of(any_float, any_int, wrong) for f in FLOATS},
    "stop": st.one_of(any_text, st.lists(any_text, max_size=20), wrong),
    "stop_token_ids": st.one_of(st.lists(any_int, min_size=1, max_size=20), wrong),
    **{b: wrong for b in BOOLS},
}
poison = st.one_of(
    st.just({}),
    st.sampled_from(sorted(bad)).flatmap(lambda f: bad[f].map(lambda v: {f: v})),
)
kwargs_st = st.tuples(st.fixed_dictionaries({}, optional=good), poison).map(
    lambda t: {**t[0], **t[1]}
)
good_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)
bad_ids = st.lists(st.one_of(st.integers(0, VOCAB + 5), any_int, wrong), max_size=40)
prompt_st = st.one_of(
    good_text,
    st.fixed_dictionaries({"prompt_token_ids": good_ids}),
    st.lists(
        st.one_of(good_text, good_ids.map(lambda i: {"prompt_token_ids": i})),
        min_size=1,
        max_size=3,
    ),
    # and the bad ones: surrogates, empty, out-of-vocabulary or non-int ids, too long, no key
    any_text,
    st.fixed_dictionaries({"prompt_token_ids": st.one_of(bad_ids, wrong)}),
    st.fixed_dictionaries({"prompt": st.one_of(any_text, wrong)}),
    st.fixed_dictionaries({}),
)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    engine = dict(max_model_len=32, max_num_batched_tokens=32, max_num_seqs=8)
    with LLM(str(tiny_model_dir), enable_warmup=False, show_progress=False, **engine) as llm:
        yield llm


def _names_a_field(e: ValueError) -> bool:
    m = re.match(r"^(\w+)", str(e))
    return m is not None and m.group(1) in NAMES


def _shorten(params: SamplingParams) -> SamplingParams:
    """The same params, generating at most MAX_TOKENS tokens and 2 completions."""
    max_tokens = min(params.max_tokens or MAX_TOKENS, MAX_TOKENS)
    return params.with_updates(
        max_tokens=max_tokens, min_tokens=min(params.min_tokens, max_tokens), n=min(params.n, 2)
    )


def _known_bad(test):
    """The inputs that killed or leaked in the engine before (issue 10) always run."""
    cases = [({f: v}, "hi") for f in INT_FIELDS for v in (2**31, 2**64, 2**70, -(2**63))]
    cases += [({f: math.nan}, "hi") for f in FLOATS]
    cases += [({"stop_token_ids": [2**31]}, "hi"), ({"stop": ["\ud800"]}, "hi")]
    cases += [({}, "\ud800"), ({}, {"prompt_token_ids": [2**31]}), ({}, {"prompt": "a\udfff"})]
    cases += [({}, {"prompt_token_ids": [True]}), ({}, "\u0000")]
    for kwargs, prompt in cases:
        test = example(kwargs=kwargs, prompt=prompt)(test)
    return test


@_known_bad
@given(kwargs=kwargs_st, prompt=prompt_st)
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
    database=None,
)
def test_generate_never_kills_the_engine(llm, kwargs, prompt):
    try:
        params = SamplingParams(**kwargs)
    except ValueError as e:
        assert _names_a_field(e), e
        event("refused: SamplingParams")
        params = None
    if params is not None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            assert math.isfinite(getattr(params, name))
        try:
            outs = llm.generate(prompt, _shorten(params), use_tqdm=False)
        except ValueError as e:
            assert _names_a_field(e), e
            event("refused: generate")
        else:
            event("generated")
            for out in outs:
                assert all(0 <= t < VOCAB for c in out.outputs for t in c.token_ids)
    ok = llm.generate("hi", SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 1
    # and nothing a refused or finished request held is left behind
    stats = llm.stats
    assert stats["num_running_reqs"] == stats["num_waiting_reqs"] == 0
    assert stats["kv_cache_usage"] == 0.0
