"""InputProcessor on its own: prompts -> checked ids -> one EngineCoreRequest per completion."""

from __future__ import annotations

import pytest

from jaxserve.core.admission import RequestLimits
from jaxserve.engine.processor import InputProcessor, ProcessedPrompt
from jaxserve.sampling_params import SamplingParams

VOCAB = 300
MAX_LEN = 16


class ByteTokenizer:
    """One token per UTF-8 byte: enough to see what the processor does with the ids."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


def _processor(seed: int = 0) -> InputProcessor:
    limits = RequestLimits(
        vocab_size=VOCAB, max_model_len=MAX_LEN, block_size=4, num_usable_blocks=MAX_LEN // 4
    )
    return InputProcessor(ByteTokenizer(), limits=limits, eos_token_id=2, seed=seed)


def test_text_and_token_prompts():
    p = _processor()
    assert p.process_prompt("hi") == ProcessedPrompt("hi", [104, 105])
    assert p.process_prompt({"prompt": "hi"}) == ProcessedPrompt("hi", [104, 105])
    ids = p.process_prompt({"prompt_token_ids": [1, 2, 299], "prompt": "x"})
    assert ids == ProcessedPrompt("x", [1, 2, 299])


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "prompt must not be empty"),
        ({"prompt_token_ids": []}, "prompt must not be empty"),
        ({"prompt_token_ids": [1, 300]}, r"prompt_token_ids\[1\]"),
        ({"prompt_token_ids": [1, -1]}, r"prompt_token_ids\[1\]"),
        ({"prompt_token_ids": [True]}, r"prompt_token_ids\[0\]"),
        ({"prompt_token_ids": "12"}, "prompt_token_ids must be a list"),
        ({"text": "hi"}, "'prompt' or 'prompt_token_ids'"),
        (["hi"], "prompt must be a string or a dict"),
        ("a\ud800", "prompt holds a lone surrogate"),
        ({"prompt_token_ids": [1], "prompt": "\udfff"}, "prompt holds a lone surrogate"),
    ],
)
def test_bad_prompts_name_the_field(prompt, message):
    with pytest.raises(ValueError, match=message):
        _processor().process_prompt(prompt)


def test_prompt_length_leaves_room_to_generate():
    p = _processor()
    assert len(p.process_prompt("x" * (MAX_LEN - 1)).prompt_token_ids) == MAX_LEN - 1
    with pytest.raises(ValueError, match=f"max_model_len={MAX_LEN}"):
        p.process_prompt("x" * MAX_LEN)


def test_max_tokens_is_capped_by_the_room_left():
    p = _processor()
    prompt = p.process_prompt("abcd")  # 4 tokens: 12 left
    for asked, got in ((None, 12), (5, 5), (50, 12)):
        [req] = p.make_requests("r", prompt, SamplingParams(max_tokens=asked))
        assert req.max_tokens == got and req.eos_token_id == 2


def test_requests_breaking_an_admission_rule_are_refused():
    p = _processor()
    prompt = p.process_prompt("ab")
    with pytest.raises(ValueError, match=r"stop_token_ids\[0\] must be a token id"):
        p.make_requests("r", prompt, SamplingParams(stop_token_ids=[300]))
    with pytest.raises(ValueError, match="sampling_params must be SamplingParams"):
        p.make_requests("r", prompt, {"temperature": 0})
    with pytest.raises(ValueError, match="request_id must not start with"):
        p.make_requests("__jaxserve_probe__:x", prompt, SamplingParams())


def test_n_completions_get_their_own_ids_and_seeds():
    p = _processor()
    prompt = p.process_prompt("ab")
    reqs = p.make_requests("r", prompt, SamplingParams(n=3, seed=7))
    assert [r.request_id for r in reqs] == ["r:0", "r:1", "r:2"]
    assert [r.sampling_seed for r in reqs] == [7, 8, 9]
    assert all(r.prompt_token_ids == [97, 98] for r in reqs)
    [single] = p.make_requests("s", prompt, SamplingParams(seed=7))
    assert single.request_id == "s" and single.sampling_seed == 7


def test_unseeded_requests_draw_seeds_from_the_engine_seed():
    prompt = ProcessedPrompt("ab", [97, 98])
    draws = [
        [r.sampling_seed for r in _processor(seed).make_requests("r", prompt, SamplingParams(n=4))]
        for seed in (0, 0, 1)
    ]
    assert draws[0] == draws[1] != draws[2]
    assert len(set(draws[0])) == 4 and all(0 <= s < 2**31 for s in draws[0])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"priority": 2**31}, "priority must be an integer in"),
        ({"priority": True}, "priority"),
        ({"priority": 1.5}, "priority"),
        ({"cache_salt": "s\ud800"}, "cache_salt"),
    ],
)
def test_request_options_are_checked(kwargs, field):
    p = _processor()
    with pytest.raises(ValueError, match=field):
        p.make_requests("r", p.process_prompt("ab"), SamplingParams(), **kwargs)
    [req] = p.make_requests("r", p.process_prompt("ab"), SamplingParams(), priority=-(2**31))
    assert req.priority == -(2**31)
