"""AsyncLLM against a real engine-core process on the tiny random model.

One engine serves most tests (module-scoped: spawning a core costs a few seconds); the tests
that kill or shut down the core start their own.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time

import pytest
import pytest_asyncio

from jaxserve import LLM, SamplingParams
from jaxserve.config import EngineArgs
from jaxserve.engine.async_llm import AsyncLLM
from jaxserve.engine.client import EngineDeadError, EngineOverloadedError

pytestmark = pytest.mark.asyncio(loop_scope="module")

ENGINE = dict(max_model_len=128, max_num_batched_tokens=64, max_num_seqs=8, enable_warmup=False)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPT = {"prompt_token_ids": list(range(100, 120))}


def make_args(model_dir) -> EngineArgs:
    return EngineArgs(model=str(model_dir), **ENGINE)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_model_dir):
    llm = await AsyncLLM.create(make_args(tiny_model_dir), max_waiting_requests=4)
    yield llm
    await llm.shutdown()


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    with LLM(str(tiny_model_dir), show_progress=False, **ENGINE) as llm:
        yield llm


async def collect(engine, prompt, params, request_id):
    outs = [o async for o in engine.generate(prompt, params, request_id)]
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    return outs


async def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_ready_and_model_info(engine, tiny_model_dir):
    assert engine.is_ready and engine.dead_reason is None
    assert engine.max_model_len == 128
    assert engine.model_name == str(tiny_model_dir)
    assert engine.tokenizer is not None
    await asyncio.sleep(0.6)
    assert engine.heartbeat_age < 1.0  # idle, yet heartbeating


async def test_stream_matches_offline(engine, offline):
    outs = await collect(engine, PROMPT, GREEDY, "stream")
    text = "".join(o.outputs[0].text for o in outs)
    ids = [t for o in outs for t in o.outputs[0].token_ids]
    ref = offline.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(outs) > 1  # deltas, not one final blob
    assert ids == ref.token_ids and text == ref.text
    assert outs[-1].outputs[0].finish_reason == "length"


async def test_text_prompt_matches_offline(engine, offline):
    outs = await collect(engine, "Hello there", GREEDY, "text")
    ref = offline.generate("Hello there", GREEDY, use_tqdm=False)[0].outputs[0]
    assert "".join(o.outputs[0].text for o in outs) == ref.text
    assert outs[0].prompt == "Hello there"


async def test_n2(engine):
    params = SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=5, ignore_eos=True)
    outs = await collect(engine, PROMPT, params, "n2")
    ids = {0: [], 1: []}
    for o in outs:
        for c in o.outputs:
            ids[c.index].extend(c.token_ids)
    assert len(ids[0]) == len(ids[1]) == 8
    assert ids[0] != ids[1]


async def test_concurrent_requests(engine, offline):
    prompts = [{"prompt_token_ids": list(range(200 + i, 210 + 3 * i))} for i in range(4)]
    results = await asyncio.gather(
        *(collect(engine, p, GREEDY, f"conc-{i}") for i, p in enumerate(prompts))
    )
    refs = offline.generate(prompts, GREEDY, use_tqdm=False)
    for outs, ref in zip(results, refs, strict=True):
        assert [t for o in outs for t in o.outputs[0].token_ids] == ref.outputs[0].token_ids


async def test_stop_string(engine, offline):
    ref = offline.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].text
    stop = ref[len(ref) // 2 : len(ref) // 2 + 2]
    assert stop.strip()
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop])
    outs = await collect(engine, PROMPT, params, "stop")
    text = "".join(o.outputs[0].text for o in outs)
    assert text == ref[: ref.index(stop)]
    assert outs[-1].outputs[0].finish_reason == "stop"
    assert outs[-1].outputs[0].stop_reason == stop


async def test_validation_names_the_field(engine):
    with pytest.raises(ValueError, match="prompt_token_ids"):
        await anext(engine.generate({"prompt_token_ids": [10**9]}, GREEDY, "bad"))
    with pytest.raises(ValueError, match="max_model_len"):
        await anext(engine.generate({"prompt_token_ids": [1] * 200}, GREEDY, "long"))
    with pytest.raises(ValueError, match="sampling_params"):
        await anext(engine.generate(PROMPT, {"temperature": 0}, "badparams"))
    assert engine.stats.num_waiting_reqs == 0


async def test_early_close_aborts_and_frees_blocks(engine):
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    gen = engine.generate(PROMPT, params, "early")
    first = await anext(gen)
    assert not first.finished
    await gen.aclose()  # what a client disconnect does to the server's iterator
    await wait_for(
        lambda: engine.stats.kv_cache_usage == 0.0 and engine.stats.num_running_reqs == 0
    )


async def test_cancelled_consumer_aborts(engine):
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)

    async def consume():
        async for _ in engine.generate(PROMPT, params, "cancelled"):
            pass

    task = asyncio.create_task(consume())
    await wait_for(lambda: engine.stats.num_running_reqs > 0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: engine.stats.kv_cache_usage == 0.0)


async def test_abort_ends_the_stream(engine):
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    gen = engine.generate(PROMPT, params, "aborted")
    await anext(gen)
    await engine.abort("aborted")
    rest = [o async for o in gen]
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    await wait_for(lambda: engine.stats.kv_cache_usage == 0.0)


async def test_overload(engine):
    # max_waiting_requests=4: four requests not yet producing output fill the queue
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    gens = [engine.generate(PROMPT, params, f"ov-{i}") for i in range(5)]
    started = [asyncio.ensure_future(anext(g)) for g in gens[:4]]
    await asyncio.sleep(0)  # each ran up to its first await: all four are queued
    with pytest.raises(EngineOverloadedError):
        await anext(gens[4])
    await asyncio.gather(*started)
    for g in gens[:4]:
        async for _ in g:
            pass


async def test_check_health_live(engine):
    await engine.check_health(timeout=10.0)


async def test_probe_is_not_blocked_by_a_full_batch(engine):
    # 7 long requests fill the 7 user seats of max_num_seqs=8; the probe takes the reserved one
    params = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    gens = [engine.generate({"prompt_token_ids": [5 + i]}, params, f"full-{i}") for i in range(7)]
    for g in gens[:4]:
        await anext(g)
    tasks = [asyncio.ensure_future(anext(g)) for g in gens[4:]]
    await asyncio.gather(*tasks)
    await wait_for(lambda: engine.stats.num_running_reqs == 7)
    await engine.check_health(timeout=10.0)
    for g in gens:
        await g.aclose()
    await wait_for(lambda: engine.stats.kv_cache_usage == 0.0)


async def test_embed(engine):
    a1 = await engine.embed([10, 11, 12, 13])
    a2 = await engine.embed([10, 11, 12, 13])
    b = await engine.embed(list(range(300, 340)))
    assert len(a1) == 64  # hidden_size of the tiny model
    assert math.isclose(math.sqrt(sum(x * x for x in a1)), 1.0, rel_tol=1e-5)
    assert a1 == pytest.approx(a2, abs=1e-6)
    assert max(abs(x - y) for x, y in zip(a1, b, strict=True)) > 1e-3
    with pytest.raises(ValueError, match="prompt_token_ids"):
        await engine.embed([])
    # the KV cache the embedding never touched still serves a request correctly
    await collect(engine, PROMPT, GREEDY, "after-embed")


def _unchecked(params: SamplingParams, **values) -> SamplingParams:
    """params with fields set past SamplingParams' own validation (what a buggy or hostile
    caller could hand the engine)."""
    for name, value in values.items():
        object.__setattr__(params, name, value)
    return params


async def test_refusals_leave_nothing_registered(engine):
    """Each way a request is refused once generate() has begun; done more times than
    max_waiting_requests (4), so one leaked registration each would end in 429 forever."""
    base = dict(temperature=0.0, max_tokens=4, ignore_eos=True)
    cases = [
        # the wire cannot carry it: refused API-side, before registration
        ("cache_salt", lambda: SamplingParams(**base), "\ud800"),
        # (SamplingParams itself refuses a lone surrogate in stop; generate() must too)
        ("stop", lambda: _unchecked(SamplingParams(**base), stop=("ok", "\ud800")), None),
        ("top_k", lambda: _unchecked(SamplingParams(**base), top_k=2**64), None),
        # the wire carries it, the core refuses it (int32): after registration
        ("top_k", lambda: _unchecked(SamplingParams(**base), top_k=3_000_000_000), None),
        ("top_k", lambda: _unchecked(SamplingParams(**base), top_k=2**63), None),
    ]
    for field, make_params, salt in cases:
        for i in range(5):
            gen = engine.generate(PROMPT, make_params(), f"refused-{field}-{i}", cache_salt=salt)
            with pytest.raises(ValueError, match=field) as err:
                await anext(gen)
            assert "Traceback" not in str(err.value)
            await gen.aclose()
        inflight = engine._inflight
        assert not inflight.requests and not inflight.core_to_user, field
        assert not inflight.output_processor.has_unfinished_requests()
    await wait_for(lambda: engine.stats.num_waiting_reqs == 0 and engine.stats.kv_cache_usage == 0)
    await collect(engine, PROMPT, GREEDY, "after-refusals")
    await engine.check_health(timeout=10.0)


async def test_killed_core_is_restarted(tiny_model_dir):
    llm = await AsyncLLM.create(make_args(tiny_model_dir))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
        gen = llm.generate(PROMPT, params, "doomed")
        await anext(gen)
        first_pid = llm.core_pid
        os.kill(first_pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="SIGKILL"):
            async for _ in gen:
                pass
        assert time.monotonic() - start < 5.0
        # healing: not dead for good, but not serving either
        assert llm.dead_reason is None and not llm.is_ready
        assert "restarting" in llm.unavailable_reason
        with pytest.raises(EngineDeadError, match="restarting"):
            await anext(llm.generate(PROMPT, params, "during-restart"))
        with pytest.raises(EngineDeadError):
            await llm.check_health(timeout=1.0)
        await wait_for(lambda: llm.is_ready, timeout=60.0)
        assert llm.core_pid != first_pid and llm.num_core_restarts == 1
        await collect(llm, PROMPT, GREEDY, "after-restart")
        await llm.check_health(timeout=10.0)
        await wait_for(lambda: llm.stats.kv_cache_usage == 0.0 and llm.stats.num_core_restarts == 1)
        assert not llm._inflight.requests
    finally:
        await llm.shutdown()


async def test_shutdown_leaves_no_child(tiny_model_dir):
    import multiprocessing

    llm = await AsyncLLM.create(make_args(tiny_model_dir))
    pid = llm.core_pid
    await llm.shutdown()
    assert llm.dead_reason == "engine shut down"
    assert pid not in [p.pid for p in multiprocessing.active_children()]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    await llm.shutdown()  # idempotent


async def test_startup_failure_reports_the_core_error(tmp_path):
    with pytest.raises(RuntimeError, match="engine core failed to start"):
        await AsyncLLM.create(EngineArgs(model=str(tmp_path / "missing"), **ENGINE))


async def test_hung_core_is_killed_and_no_restarts_left_is_final(tiny_model_dir):
    llm = await AsyncLLM.create(make_args(tiny_model_dir), max_core_restarts=0)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
        gen = llm.generate(PROMPT, params, "hung")
        await anext(gen)
        # short only now: the first step may compile for longer than a second, heartbeat-less
        llm._supervisor.hang_timeout_s = 1.0
        pid = llm.core_pid
        os.kill(pid, signal.SIGSTOP)  # alive, but its loop no longer turns
        with pytest.raises(EngineDeadError, match="no heartbeat"):
            async for _ in gen:
                pass
        reason = await asyncio.wait_for(llm.wait_dead(), 10.0)
        assert "no heartbeat" in reason and "max_core_restarts=0" in reason
        assert llm.dead_reason == reason and llm.num_core_restarts == 0
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed and reaped
        with pytest.raises(EngineDeadError):
            await anext(llm.generate(PROMPT, params, "after-death"))
    finally:
        await llm.shutdown()
