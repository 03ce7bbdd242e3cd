"""The IPC schema: every message round-trips typed; anything off-schema is rejected, never run."""

from __future__ import annotations

import pickle

import msgspec
import pytest

from jaxserve.core.admission import EngineCoreRequest, RequestLimits
from jaxserve.core.outputs import EngineCoreOutput, SchedulerStats, TokenLogprobs
from jaxserve.engine import ipc
from jaxserve.request import FinishReason
from jaxserve.sampling_params import SamplingParams

TO_CORE = [
    EngineCoreRequest(
        request_id="r1:0",
        prompt_token_ids=[1, 2, 3],
        sampling_params=SamplingParams(
            temperature=0.5, stop=["\n"], stop_token_ids=[7], seed=3, n=2
        ),
        sampling_seed=3,
        max_tokens=10,
        eos_token_id=2,
        priority=-1,
        cache_salt="salt",
        arrival_time=12.5,
    ),
    EngineCoreRequest(
        request_id="r2",
        prompt_token_ids=[5],
        sampling_params=SamplingParams(),
        sampling_seed=0,
        max_tokens=1,
        eos_token_id=None,
    ),
    ipc.Abort(request_ids=["a", "b"]),
    ipc.Finish(request_id="r1:1", stop_reason="###"),
    ipc.HealthProbe(probe_id="p1"),
    ipc.Embed(req_id="e1", token_ids=[4, 5, 6]),
    ipc.Shutdown(),
]

STATS = SchedulerStats(
    num_running_reqs=2, num_waiting_reqs=1, kv_cache_usage=0.25, num_used_blocks=3
)
FROM_CORE = [
    ipc.Ready(
        limits=RequestLimits(
            vocab_size=100, max_model_len=128, block_size=16, num_usable_blocks=32
        ),
        eos_token_id=2,
        startup_seconds=1.5,
        warmup_seconds=0.0,
    ),
    ipc.Outputs(
        outputs=[
            EngineCoreOutput("r1:0", [5, 6]),
            EngineCoreOutput(
                "r2",
                [9],
                new_logprobs=[TokenLogprobs(9, -0.25, 1, [(9, -0.25), (3, -1.5)])],
                finish_reason=FinishReason.STOP,
                stop_reason=9,
                num_cached_tokens=16,
            ),
            EngineCoreOutput("r3", [1], finish_reason=FinishReason.LENGTH, stop_reason="x"),
        ],
        scheduler_stats=STATS,
    ),
    ipc.Outputs(outputs=[]),
    ipc.Heartbeat(time=1.0, num_running=2, num_waiting=1, stats=STATS),
    ipc.ProbeResult(probe_id="p1", token_id=17, latency_s=0.01),
    ipc.EmbedResult(req_id="e1", embedding=[0.6, 0.8]),
    ipc.Error(message="boom", request_id="r1:0", is_invalid_request=True),
    ipc.Error(message="fatal", fatal=True),
]


@pytest.mark.parametrize("message", TO_CORE, ids=lambda m: type(m).__name__)
def test_to_core_round_trip(message):
    sender, receiver = ipc.client_codec(), ipc.core_codec()
    decoded = receiver.decode(sender.encode(message))
    assert type(decoded) is type(message)
    assert decoded == message


@pytest.mark.parametrize("message", FROM_CORE, ids=lambda m: type(m).__name__)
def test_from_core_round_trip(message):
    sender, receiver = ipc.core_codec(), ipc.client_codec()
    decoded = receiver.decode(sender.encode(message))
    assert decoded == message
    if isinstance(decoded, ipc.Outputs) and decoded.outputs:
        out = decoded.outputs[1]
        assert out.finish_reason is FinishReason.STOP
        assert isinstance(out.new_logprobs[0], TokenLogprobs)
        assert out.new_logprobs[0].top == [(9, -0.25), (3, -1.5)]


def test_sampling_params_decode_as_the_dataclass_and_validate_again():
    decoded = ipc.core_codec().decode(ipc.client_codec().encode(TO_CORE[0]))
    assert isinstance(decoded.sampling_params, SamplingParams)
    assert decoded.sampling_params.stop == ("\n",)
    raw = msgspec.msgpack.encode(
        {
            "type": "EngineCoreRequest",
            "request_id": "r",
            "prompt_token_ids": [1],
            "sampling_params": {"top_p": 5.0},
            "sampling_seed": 0,
            "max_tokens": 1,
            "eos_token_id": None,
        }
    )
    with pytest.raises(msgspec.ValidationError, match="top_p"):
        ipc.core_codec().decode(raw)


@pytest.mark.parametrize(
    "raw",
    [
        pickle.dumps(ipc.Shutdown()),  # a pickle is just bytes that fail to parse
        msgspec.msgpack.encode({"type": "Nope"}),  # unknown tag
        msgspec.msgpack.encode({"type": "Abort", "request_ids": "not-a-list"}),
        msgspec.msgpack.encode({"type": "Embed", "req_id": "e"}),  # missing field
        msgspec.msgpack.encode([1, 2, 3]),
        b"\xc1",  # never-used msgpack byte
    ],
)
def test_malformed_messages_are_rejected(raw):
    with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)):
        ipc.core_codec().decode(raw)


def test_direction_is_enforced():
    # a core-bound message is not a valid core -> API message, and vice versa
    with pytest.raises(msgspec.ValidationError):
        ipc.client_codec().decode(ipc.core_codec().encode(ipc.Shutdown()))
    with pytest.raises(msgspec.ValidationError):
        ipc.core_codec().decode(ipc.client_codec().encode(FROM_CORE[0]))


def test_ipc_paths_are_private_and_cleaned_up():
    import os
    import stat

    paths = ipc.IpcPaths.make()
    assert stat.S_IMODE(os.stat(paths.dir).st_mode) == 0o700
    assert paths.to_core.startswith("ipc://" + paths.dir)
    paths.cleanup()
    assert not os.path.exists(paths.dir)


def test_salvage_id_of_a_bad_message():
    from jaxserve.engine.core_proc import _salvage_id

    bad = msgspec.msgpack.encode(
        {"type": "EngineCoreRequest", "request_id": "r9", "sampling_params": {}}
    )
    assert _salvage_id(bad) == "r9"
    assert _salvage_id(b"\xc1") is None
    assert _salvage_id(msgspec.msgpack.encode([1])) is None
