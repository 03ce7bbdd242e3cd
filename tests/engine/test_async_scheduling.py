"""Async scheduling (engine/core.py): step k+1 is scheduled and launched before step k is read
back, and it gives exactly the tokens of synchronous steps.

The oracle is the engine itself with async_scheduling off, on the same requests: greedy and
seeded sampling, n > 1, logprobs, stop tokens and max_tokens landing one step late,
preemption, penalties and grammars (their sampler inputs are staged after the previous step
is read back, so they step asynchronously too), aborts while a step runs.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from jaxserve import LLM
from jaxserve.config import EngineArgs
from jaxserve.engine.core import EngineCore
from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams
from tests.engine.core_requests import core_request

# a small budget and few seats: prompts are chunked, and decodes share steps with prefills
ENGINE = dict(max_model_len=128, max_num_batched_tokens=32, max_num_seqs=8, enable_warmup=False)


def _prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(rng.randrange(3, 60))]}
        for _ in range(n)
    ]


def _params(n: int, stop_at: dict[int, int] | None = None) -> list[SamplingParams]:
    """Greedy, seeded-random, n=2 and logprobs rows in turn; stop_at: row -> a stop token."""
    out = []
    for i in range(n):
        kind = i % 4
        kw: dict = dict(max_tokens=4 + (i * 7) % 19, ignore_eos=True)
        if kind == 0:
            kw.update(temperature=0.0)
        elif kind == 1:
            kw.update(temperature=0.9, top_p=0.9, seed=1000 + i)
        elif kind == 2:
            kw.update(temperature=0.8, n=2, seed=2000 + i)
        else:
            kw.update(temperature=0.0, logprobs=3)
        if stop_at and i in stop_at:
            kw.update(stop_token_ids=[stop_at[i]])
        out.append(SamplingParams(**kw))
    return out


def _generate(model_dir, prompts, params, **engine) -> tuple[list, dict]:
    with LLM(model=str(model_dir), **{**ENGINE, **engine}) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = dict(llm.stats)
        core = llm._engine().core
        assert not core.has_unfinished_requests()
        assert core.make_stats().num_used_blocks == 0  # no block outlives its request
    return outs, stats


def _completions(outs, *, logprobs: bool = True) -> list:
    return [
        [
            (c.token_ids, c.finish_reason, c.stop_reason, c.logprobs if logprobs else None)
            for c in o.outputs
        ]
        for o in outs
    ]


def _logprob_values(outs) -> tuple[list, np.ndarray]:
    keys, values = [], []
    for o in outs:
        for c in o.outputs:
            for pos in c.logprobs or ():
                keys.append(sorted(pos))
                values += [pos[k].logprob for k in sorted(pos)]
    return keys, np.asarray(values, np.float32)


@pytest.mark.parametrize("num_blocks", [None, 20], ids=["ample", "preempting"])
def test_async_gives_the_tokens_of_sync(tiny_model_dir, num_blocks):
    prompts = _prompts(24, seed=num_blocks or 0)
    engine = {} if num_blocks is None else {"num_gpu_blocks_override": num_blocks}
    first, _ = _generate(tiny_model_dir, prompts, _params(24), **engine)
    # stop tokens taken from the run itself, so requests stop early, each at its own step
    stop_at = {i: o.outputs[0].token_ids[2 + i % 3] for i, o in enumerate(first) if i % 2}
    params = _params(24, stop_at)
    sync, sync_stats = _generate(tiny_model_dir, prompts, params, **engine)
    asyn, async_stats = _generate(tiny_model_dir, prompts, params, async_scheduling=True, **engine)
    assert sum(c.finish_reason == "stop" for o in sync for c in o.outputs) >= 6
    if num_blocks is None:
        assert _completions(asyn) == _completions(sync)  # logprobs bit for bit too
        return
    assert sync_stats["num_preemptions"] > 0 and async_stats["num_preemptions"] > 0
    assert _completions(asyn, logprobs=False) == _completions(sync, logprobs=False)
    # Preemption recomputes decoded tokens as prompt tiles, and the two runs preempt in
    # different steps: a logprob may then differ in its last bits (the documented decode vs
    # tile rounding, <= 16 ulps; measured here: 2 ulps on one request of 24).
    keys, values = _logprob_values(asyn)
    sync_keys, sync_values = _logprob_values(sync)
    assert keys == sync_keys
    np.testing.assert_allclose(values, sync_values, rtol=16 * np.finfo(np.float32).eps, atol=0)


def test_penalties_and_grammars_step_asynchronously_with_the_same_tokens(tiny_model_dir):
    prompts = _prompts(12, seed=5)
    params = _params(12)
    params[1] = SamplingParams(temperature=0.0, max_tokens=12, presence_penalty=1.5)
    params[4] = SamplingParams(temperature=0.0, max_tokens=12, repetition_penalty=1.3)
    params[6] = SamplingParams(
        temperature=0.0,
        max_tokens=12,
        structured_outputs=StructuredOutputsParams(choice=["zebra-42", "yak-7"]),
    )
    params[9] = SamplingParams(temperature=0.0, max_tokens=12, allowed_token_ids=[500, 501, 502])
    sync, _ = _generate(tiny_model_dir, prompts, params)
    asyn, _ = _generate(tiny_model_dir, prompts, params, async_scheduling=True)
    assert _completions(asyn) == _completions(sync)
    assert asyn[6].outputs[0].text in ("zebra-42", "yak-7")
    assert set(asyn[9].outputs[0].token_ids) <= {500, 501, 502}


class _Trace:
    """Records the runner's launch (L), sample (S) and collect (C) calls, and the token
    bitmask fills (F), in order."""

    def __init__(self, core: EngineCore) -> None:
        self.events: list[str] = []
        runner, masks = core.runner, core.token_masks
        for obj, name, event in (
            (runner, "launch", "L"),
            (runner, "sample", "S"),
            (runner, "collect", "C"),
            (masks, "fill", "F"),
        ):
            setattr(obj, name, self._traced(getattr(obj, name), event))

    def _traced(self, fn, event: str):
        def traced(*args, **kwargs):
            self.events.append(event)
            return fn(*args, **kwargs)

        return traced

    @property
    def calls(self) -> str:
        """The events as one string, e.g. "LSFLCSF..." (S is logged before its fill runs)."""
        return "".join(self.events)

    @property
    def max_in_flight(self) -> int:
        depth = most = 0
        for e in self.events:
            if e in "LC":
                depth += 1 if e == "L" else -1
                most = max(most, depth)
        return most


@pytest.fixture(scope="module")
def async_core(tiny_model_dir):
    args = EngineArgs(model=str(tiny_model_dir), async_scheduling=True, **ENGINE)
    core = EngineCore(args, show_progress=False)
    yield core
    core.close()


def _drain(core: EngineCore) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for _ in range(500):
        if not core.has_unfinished_requests():
            break
        for o in core.step().outputs:
            assert o.error is None, o.error
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert not core.has_unfinished_requests()
    return tokens


GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def test_the_next_step_is_launched_before_the_last_is_collected(async_core):
    trace = _Trace(async_core)
    for i in range(3):
        async_core.add_request(core_request(f"plain-{i}", list(range(200 + i, 220 + i)), GREEDY))
    tokens = _drain(async_core)
    assert all(len(t) == 10 for t in tokens.values())
    # two steps on the device's queue at once, in every step but the first and the last
    assert trace.max_in_flight == 2
    # the second step goes out (forward, then sampler) before the first is read back
    assert trace.calls.startswith("LSLSC")
    # the last launch ran only requests that had ended by then: it is not waited for
    assert trace.events.count("L") == trace.events.count("C") + 1


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=8, frequency_penalty=0.5),
        SamplingParams(
            temperature=0.0,
            max_tokens=8,
            structured_outputs=StructuredOutputsParams(regex="[a-z]{20,30}"),
        ),
    ],
    ids=["penalty", "grammar"],
)
def test_penalty_and_grammar_requests_step_asynchronously(async_core, params):
    trace = _Trace(async_core)
    async_core.add_request(core_request("ruled", list(range(300, 320)), params))
    assert len(_drain(async_core)["ruled"]) == 8
    assert trace.max_in_flight == 2
    # its sampler waits for the step before to be read back (its history, its grammar)
    assert trace.calls.replace("F", "").startswith("LS" + "LCS" * 6)
    if params.structured_outputs is None:
        return
    # each step's mask is filled after its forward is launched (S is logged as it starts)
    # and, from the second step on, after the previous step is read back: the grammar has
    # its last token, and the fill runs while the forward is on the device
    assert trace.calls.startswith("LSF" + "LCSF" * 6)


def test_abort_while_a_step_runs_frees_everything(async_core):
    for i in range(4):
        async_core.add_request(core_request(f"a-{i}", list(range(400 + i, 430 + i)), GREEDY))
    seen: dict[str, list[int]] = {}
    for _ in range(4):  # past the prefills: a-1's decode is in flight now
        for o in async_core.step().outputs:
            seen.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert async_core.steps.in_flight is not None
    async_core.abort_requests(["a-1"])
    rest = _drain(async_core)
    assert "a-1" not in rest  # its in-flight token is dropped, not sent
    assert all(len(seen.get(r, []) + rest[r]) == 10 for r in ("a-0", "a-2", "a-3"))
    stats = async_core.make_stats()
    assert stats.num_used_blocks == 0 and not async_core.scheduler.requests


def test_placeholders_come_back_to_zero(async_core):
    requests = [
        async_core.to_request(core_request(f"p-{i}", list(range(500 + i, 510 + i)), GREEDY))
        for i in range(3)
    ]
    for r in requests:
        async_core.admit(r)
    while async_core.has_unfinished_requests():
        async_core.step()
        # never more than one sampled token outstanding per request
        assert all(r.num_output_placeholders in (0, 1) for r in requests)
    assert [r.num_output_placeholders for r in requests] == [0, 0, 0]
    assert [r.num_output_tokens for r in requests] == [10, 10, 10]
