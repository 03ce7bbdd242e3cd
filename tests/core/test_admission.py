"""The admission rules (core/admission.py): each refuses with the field's name, nothing else."""

from __future__ import annotations

import msgspec
import pytest

from jaxserve.core.admission import (
    PROBE_ID_PREFIX,
    EngineCoreRequest,
    RequestLimits,
    check_embed_len,
    check_new_request_id,
    check_prompt_len,
    validate_core_request,
)
from jaxserve.sampling_params import SamplingParams

# 4 blocks of 4 tokens: a request may hold at most 16 tokens of KV
LIMITS = RequestLimits(vocab_size=100, max_model_len=32, block_size=4, num_usable_blocks=4)


def _request(**overrides: object) -> EngineCoreRequest:
    fields: dict[str, object] = dict(
        request_id="r",
        prompt_token_ids=[1, 2, 3],
        sampling_params=SamplingParams(),
        sampling_seed=0,
        max_tokens=4,
        eos_token_id=2,
    )
    fields.update(overrides)
    return EngineCoreRequest(**fields)  # type: ignore[arg-type]


def test_a_good_request_passes():
    validate_core_request(_request(), LIMITS)
    validate_core_request(_request(prompt_token_ids=[99] * 10, max_tokens=7), LIMITS)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"prompt_token_ids": []}, "prompt_token_ids must not be empty"),
        ({"prompt_token_ids": [1, 100]}, r"prompt_token_ids\[1\] must be a token id"),
        ({"prompt_token_ids": [-1]}, r"prompt_token_ids\[0\]"),
        ({"prompt_token_ids": [1] * 32}, "prompt_token_ids has 32 tokens.*max_model_len=32"),
        ({"max_tokens": 0}, r"max_tokens must be in \[1, 29\]"),
        ({"prompt_token_ids": [1] * 30, "max_tokens": 3}, r"max_tokens must be in \[1, 2\]"),
        (
            {"prompt_token_ids": [1] * 10, "max_tokens": 8},
            "need up to 5 KV blocks, more than the 4",
        ),
        ({"eos_token_id": 100}, "eos_token_id"),
        ({"sampling_params": SamplingParams(stop_token_ids=[5, 100])}, r"stop_token_ids\[1\]"),
        ({"sampling_params": {"temperature": 0}}, "sampling_params must be SamplingParams"),
        ({"priority": 2**31}, "priority must be an integer in"),
        ({"cache_salt": "a\ud800"}, "cache_salt"),
        ({"request_id": PROBE_ID_PREFIX + "x"}, "request_id must not start with"),
    ],
)
def test_each_rule_names_its_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_core_request(_request(**overrides), LIMITS)


def test_probes_may_use_their_prefix_and_priority():
    probe = _request(request_id=PROBE_ID_PREFIX + "p#0", priority=-(1 << 62))
    validate_core_request(probe, LIMITS, is_probe=True)
    with pytest.raises(ValueError, match="request_id"):
        validate_core_request(probe, LIMITS)


def test_the_kv_bound_counts_the_last_token_as_never_computed():
    # 10 + 7 - 1 = 16 tokens of KV: exactly the 4 blocks of 4
    validate_core_request(_request(prompt_token_ids=[1] * 10, max_tokens=7), LIMITS)
    with pytest.raises(ValueError, match="KV blocks"):
        LIMITS.check_kv_capacity(10, 8)


def test_max_tokens_is_capped_by_the_room_left():
    assert LIMITS.resolve_max_tokens(4, None) == 28
    assert LIMITS.resolve_max_tokens(4, 5) == 5
    assert LIMITS.resolve_max_tokens(4, 50) == 28


def test_lengths_of_prompts_and_embedding_inputs():
    check_prompt_len(31, 32)
    with pytest.raises(ValueError, match="^messages has 32 tokens"):
        check_prompt_len(32, 32, "messages")
    check_embed_len(32, 32)  # nothing is generated: the whole context may be input
    for n in (0, 33):
        with pytest.raises(ValueError, match=f"^input must hold 1 to max_model_len=32 .*got {n}"):
            check_embed_len(n, 32)


def test_request_ids_must_be_new():
    check_new_request_id("a", {"b": 1})
    with pytest.raises(ValueError, match="request_id 'a' is already in use"):
        check_new_request_id("a", {"a": 1})


def test_the_messages_round_trip_typed():
    request = _request(
        sampling_params=SamplingParams(temperature=0.5, stop=["x"], seed=3),
        priority=-1,
        cache_salt="salt",
        arrival_time=1.5,
    )
    data = msgspec.msgpack.encode(request)
    assert msgspec.msgpack.decode(data, type=EngineCoreRequest) == request
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(LIMITS), type=RequestLimits) == LIMITS
    bad = msgspec.msgpack.encode({**msgspec.to_builtins(request), "max_tokens": "4"})
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(bad, type=EngineCoreRequest)
