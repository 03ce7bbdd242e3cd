"""One request's failure on the host side of a step stays that request's (in-process core).

A request that fails while its part of a step is scheduled or staged ends alone with an error
output, its blocks are freed (none stays in the prefix cache with KV never written), and the
other requests' tokens are exactly those of a run without it.
"""

from __future__ import annotations

import pytest

from jaxserve.config import EngineArgs
from jaxserve.core.admission import EngineCoreRequest
from jaxserve.engine.core import EngineCore
from jaxserve.engine.core_interface import EngineCoreInterface
from jaxserve.request import Request
from jaxserve.runner import input_batch
from jaxserve.runner.sampling_metadata import SamplingRow
from jaxserve.sampling_params import SamplingParams
from tests.engine.core_requests import core_request

ENGINE = dict(max_model_len=64, max_num_batched_tokens=64, max_num_seqs=8, enable_warmup=False)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = {f"ok-{i}": list(range(300 + 7 * i, 311 + 9 * i)) for i in range(3)}
# 40 tokens: two full blocks of 16 that a second request with the same prompt hits
SHARED = list(range(1000, 1040))


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def core(tiny_model_dir, request):
    """async: a failure found at staging must be applied before the next step is scheduled,
    which async scheduling runs before the failed step is collected."""
    args = EngineArgs(model=str(tiny_model_dir), async_scheduling=request.param, **ENGINE)
    c = EngineCore(args, show_progress=False)
    yield c
    c.close()


def _fail_staging_of(
    request_id: str, monkeypatch: pytest.MonkeyPatch, *, phase: str = "forward"
) -> None:
    """Staging `request_id`'s sampling row raises (as a value its arrays cannot hold would):
    when it takes its row, before the forward (phase "forward"), or when its per-step extras
    are staged for the sampler, after the forward is dispatched (phase "sampling"; only a row
    with such extras: min_tokens or penalties)."""

    class FailingRow(SamplingRow):
        @classmethod
        def from_request(cls, request: Request, step: int | None = None) -> SamplingRow:
            if request.request_id == request_id and (step is None) == (phase == "forward"):
                raise RuntimeError("injected staging failure")
            return SamplingRow.from_request(request, step)

    monkeypatch.setattr(input_batch, "SamplingRow", FailingRow)


def test_engine_core_has_the_core_interface(core):
    assert isinstance(core, EngineCoreInterface)
    assert core.replicas == [core] and core.schedulers == [core.scheduler]


def _request(rid: str, prompt: list[int], params: SamplingParams = GREEDY) -> EngineCoreRequest:
    return core_request(rid, prompt, params)


def _unchecked_top_k(top_k: int) -> SamplingParams:
    """Params holding a top_k no int32 holds, past any validation SamplingParams may do."""
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, top_k=5)
    object.__setattr__(params, "top_k", top_k)
    return params


def _run(core: EngineCore, requests: list[EngineCoreRequest], *, check: bool = True):
    """Adds the requests (check=False: straight to the scheduler) and steps until idle."""
    for r in requests:
        if check:
            core.add_request(r)
        else:
            core.scheduler.add_request(Request.from_core_request(r))
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    errors: dict[str, str] = {}
    for _ in range(200):
        if not core.has_unfinished_requests():
            break
        for o in core.step().outputs:
            tokens[o.request_id].extend(o.new_token_ids)
            if o.error is not None:
                assert o.finished
                errors[o.request_id] = o.error
    assert not core.has_unfinished_requests()
    return tokens, errors


def _assert_idle(core: EngineCore) -> None:
    stats = core.make_stats()
    assert stats.kv_cache_usage == 0.0 and stats.num_used_blocks == 0
    assert not core.scheduler.requests and not core.scheduler.running


def _reference(core: EngineCore) -> dict[str, list[int]]:
    tokens, errors = _run(core, [_request(rid, p) for rid, p in PROMPTS.items()])
    assert not errors
    return tokens


def test_unstageable_top_k_fails_at_admission(core):
    with pytest.raises(ValueError, match="top_k"):
        core.add_request(_request("huge-top-k", [1, 2, 3], _unchecked_top_k(3_000_000_000)))
    assert not core.has_unfinished_requests()
    _assert_idle(core)


def test_overflow_past_admission_fails_that_request_alone(core):
    ref = _reference(core)
    core.scheduler.reset_prefix_cache()
    bad = _request("bad", [5, 6, 7, 8], _unchecked_top_k(3_000_000_000))
    good = [_request(rid, p) for rid, p in PROMPTS.items()]
    tokens, errors = _run(core, [good[0], bad, *good[1:]], check=False)
    assert set(errors) == {"bad"} and tokens["bad"] == []
    assert "int32" in errors["bad"] and "Traceback" not in errors["bad"]
    assert {rid: tokens[rid] for rid in PROMPTS} == ref
    _assert_idle(core)
    assert _reference(core) == ref  # and the engine serves the next requests


@pytest.mark.parametrize("where", ["staging", "scheduling"])
def test_injected_failure_fails_one_request(core, monkeypatch, where):
    ref = _reference(core)
    core.scheduler.reset_prefix_cache()
    if where == "staging":
        _fail_staging_of("bad", monkeypatch)
    else:
        kv = core.scheduler.kv_cache_manager
        allocate = kv.allocate_slots

        def failing_allocate(request, *args, **kwargs):
            if request.request_id == "bad":
                raise RuntimeError("injected scheduling failure")
            return allocate(request, *args, **kwargs)

        monkeypatch.setattr(kv, "allocate_slots", failing_allocate)
    good = [_request(rid, p) for rid, p in PROMPTS.items()]
    tokens, errors = _run(core, [good[0], _request("bad", [9, 10, 11]), *good[1:]])
    assert set(errors) == {"bad"}
    assert f"injected {where} failure" in errors["bad"] and "Traceback" not in errors["bad"]
    assert {rid: tokens[rid] for rid in PROMPTS} == ref
    _assert_idle(core)
    monkeypatch.undo()
    assert _reference(core) == ref


def test_a_failure_staging_the_sampler_fails_that_request_alone(core, monkeypatch):
    """The forward already runs with the request: it samples nothing, fails alone, and its
    blocks are freed; a sibling on its prompt's blocks reads KV that was written, and goes on."""
    ref = _reference(core)
    core.scheduler.reset_prefix_cache()
    _fail_staging_of("bad", monkeypatch, phase="sampling")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, min_tokens=2)
    good = [_request(rid, p) for rid, p in PROMPTS.items()]
    tokens, errors = _run(
        core, [good[0], _request("bad", SHARED, params), _request("sibling", SHARED), *good[1:]]
    )
    assert set(errors) == {"bad"} and tokens["bad"] == []
    assert "injected staging failure" in errors["bad"] and "Traceback" not in errors["bad"]
    assert {rid: tokens[rid] for rid in PROMPTS} == ref and len(tokens["sibling"]) == 6
    _assert_idle(core)
    monkeypatch.undo()
    again, errors = _run(core, [_request("again", SHARED)])
    assert not errors and again["again"] == tokens["sibling"]


def test_sibling_on_a_failed_requests_blocks_fails_too_and_cache_stays_clean(core, monkeypatch):
    """A request that hit the failed one's freshly cached blocks in the same step would read
    KV never written: it is left out too, and those blocks leave the prefix cache."""
    core.scheduler.reset_prefix_cache()
    clean, errors = _run(core, [_request("clean", SHARED)])
    assert not errors
    core.scheduler.reset_prefix_cache()
    _fail_staging_of("bad", monkeypatch)
    tokens, errors = _run(core, [_request("bad", SHARED), _request("sibling", SHARED)])
    assert set(errors) == {"bad", "sibling"}
    assert "failed in this step" in errors["sibling"]
    _assert_idle(core)
    monkeypatch.undo()
    again, errors = _run(core, [_request("again", SHARED)])
    assert not errors and again["again"] == clean["clean"]
