"""SamplingParams on its own: defaults, normalisation, and every bound from the one table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxserve.sampling_params import (
    FLOAT_RANGES,
    GREEDY_TEMPERATURE,
    INT_RANGES,
    MAX_BANNED_TOKEN_IDS,
    MAX_STOP_STRINGS,
    SamplingParams,
    check_text,
)


def test_vllm_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens) == (1, 1.0, 1.0, 0, 16)
    assert SamplingParams(top_k=-1).top_k == 0  # vLLM's "disabled"
    assert SamplingParams(stop="x").stop == ("x",) and SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    # numpy scalars are stored as Python numbers (what the IPC encoder takes)
    q = SamplingParams(top_k=np.int64(5), temperature=np.float32(0.5))
    assert type(q.top_k) is int and type(q.temperature) is float
    assert hash(SamplingParams(stop=["a"])) == hash(SamplingParams(stop=("a",)))


def test_greedy_is_one_threshold():
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=GREEDY_TEMPERATURE).is_greedy
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE * 2).is_greedy


@pytest.mark.parametrize("name", sorted(INT_RANGES))
def test_int_bounds_name_the_field(name):
    r = INT_RANGES[name]
    lo_ok = int(r.lo) if name != "top_k" else 0
    kwargs = {"max_tokens": None} if name == "min_tokens" else {}
    SamplingParams(**{name: lo_ok, **kwargs})
    SamplingParams(**{name: int(r.hi), **kwargs})
    for bad in (int(r.lo) - 1, int(r.hi) + 1, 2**70, True, 1.5, "3"):
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: bad, **kwargs})


@pytest.mark.parametrize("name", sorted(FLOAT_RANGES))
def test_float_bounds_refuse_nan_and_infinity(name):
    r = FLOAT_RANGES[name]
    SamplingParams(**{name: r.hi})
    for bad in (math.nan, math.inf, -math.inf, r.hi * 2 + 1, r.lo - 1, True, "0.5"):
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: bad})
    if r.is_lo_open:
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: r.lo})


def test_float_bounds_hold_as_float32():
    # 1e-300 is > 0 in float64 but 0 on the device, where top_p must stay positive
    with pytest.raises(ValueError, match="top_p.*float32"):
        SamplingParams(top_p=1e-300)


def test_cross_field_and_list_rules():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=["a"] * (MAX_STOP_STRINGS + 1))
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=[""])
    with pytest.raises(ValueError, match=r"stop\[1\]"):
        SamplingParams(stop=["ok", "\ud800"])
    with pytest.raises(ValueError, match=r"stop_token_ids\[0\]"):
        SamplingParams(stop_token_ids=[-1])
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=list(range(MAX_BANNED_TOKEN_IDS)))
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=1)


def test_check_text_refuses_lone_surrogates_only():
    assert check_text("nul \x00 and é 🙂", "prompt") == "nul \x00 and é 🙂"
    with pytest.raises(
        ValueError, match=r"prompt holds a lone surrogate \(U\+DC00\) at character 2"
    ):
        check_text("ab\udc00", "prompt")
    with pytest.raises(ValueError, match="cache_salt must be a string"):
        check_text(b"x", "cache_salt")


def test_with_updates_validates_again():
    p = SamplingParams(max_tokens=8)
    assert p.with_updates(max_tokens=4).max_tokens == 4
    with pytest.raises(ValueError, match="max_tokens"):
        p.with_updates(max_tokens=0)


def test_the_token_constraint_fields_are_normalized_and_round_trip():
    import msgspec

    from jaxserve.structured_output.params import StructuredOutputsParams

    p = SamplingParams(
        logit_bias={5: -100, 3: 2.5},
        allowed_token_ids=[1, 2],
        bad_words="hi",
        bad_words_token_ids=[[7, 8]],
        prompt_logprobs=2,
        structured_outputs=StructuredOutputsParams(json={"type": "object"}),
    )
    assert p.logit_bias == ((3, 2.5), (5, -100.0)) and p.allowed_token_ids == (1, 2)
    assert p.bad_words == ("hi",) and p.bad_words_token_ids == ((7, 8),)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams) == p


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"logit_bias": {1: 100.5}}, r"logit_bias\[1\] must be a number in \[-100, 100\]"),
        ({"logit_bias": {"1": 1}}, "logit_bias keys must be token ids"),
        ({"logit_bias": {-1: 1}}, "logit_bias holds -1"),
        ({"logit_bias": {i: 1 for i in range(257)}}, "at most 256 entries"),
        ({"logit_bias": [1, 2]}, "logit_bias must map token ids"),
        ({"allowed_token_ids": []}, "allowed_token_ids must hold at least one"),
        ({"allowed_token_ids": [1, True]}, r"allowed_token_ids\[1\]"),
        ({"bad_words": [""]}, "bad_words must hold non-empty strings"),
        ({"bad_words": ["a\ud800"]}, r"bad_words\[0\] holds a lone surrogate"),
        ({"bad_words_token_ids": [[]]}, r"bad_words_token_ids\[0\] must not be empty"),
        ({"prompt_logprobs": 21}, "prompt_logprobs must be an integer in"),
        ({"structured_outputs": {"json": {}}}, "structured_outputs must be StructuredOutputs"),
    ],
)
def test_bad_token_constraints_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
