"""Scheduler: token budget, chunked prefill, preemption, policies, stops, aborts, errors."""

import pytest

from jaxserve.config import CacheConfig, SchedulerConfig
from jaxserve.core.outputs import ModelRunnerOutput, TokenLogprobs
from jaxserve.core.scheduler import Scheduler
from jaxserve.request import FinishReason, Request, RequestStatus
from jaxserve.sampling_params import SamplingParams

BLOCK_SIZE = 4
EOS = 2


def make_scheduler(
    num_blocks=64,
    max_num_batched_tokens=64,
    max_num_seqs=8,
    max_model_len=64,
    policy="fcfs",
    enable_prefix_caching=True,
    enable_chunked_prefill=True,
    long_prefill_token_threshold=0,
):
    return Scheduler(
        SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            scheduling_policy=policy,
            enable_chunked_prefill=enable_chunked_prefill,
            long_prefill_token_threshold=long_prefill_token_threshold,
        ),
        CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=enable_prefix_caching),
        num_blocks,
    )


def make_request(req_id, prompt, max_tokens=4, priority=0, arrival_time=None, **params):
    params.setdefault("max_tokens", max_tokens)
    return Request(
        req_id,
        list(prompt),
        SamplingParams(**params),
        eos_token_id=EOS,
        sampling_seed=0,
        arrival_time=arrival_time,
        priority=priority,
        max_tokens=max_tokens,
    )


def sample_all(output, token_id=7, logprobs=None):
    """A fake runner: one token for every request that samples this step."""
    return ModelRunnerOutput(
        sampled_token_ids={
            s.request.request_id: token_id for s in output.scheduled if s.is_sampling
        },
        logprobs=logprobs or {},
    )


def step(scheduler, token_id=7):
    output = scheduler.schedule()
    return output, scheduler.update_from_output(output, sample_all(output, token_id))


def plan(output):
    """(req_id, first position, num tokens, is_sampling) for each scheduled request."""
    return [
        (s.request.request_id, s.num_computed_tokens, s.num_scheduled_tokens, s.is_sampling)
        for s in output.scheduled
    ]


def test_prefill_then_decode_to_max_tokens():
    scheduler = make_scheduler()
    request = make_request("a", range(10, 20), max_tokens=3)
    scheduler.add_request(request)
    output, result = step(scheduler)
    assert plan(output) == [("a", 0, 10, True)]
    assert output.scheduled[0].block_ids == [1, 2, 3]
    assert output.total_num_scheduled_tokens == 10
    assert request.num_computed_tokens == 10
    assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in result.outputs] == [
        ("a", [7], None)
    ]
    output, _ = step(scheduler)
    assert plan(output) == [("a", 10, 1, True)]
    output, result = step(scheduler)
    assert plan(output) == [("a", 11, 1, True)]
    assert result.outputs[0].finish_reason == FinishReason.LENGTH
    assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert request.output_token_ids == [7, 7, 7]
    assert not scheduler.has_unfinished_requests()
    assert scheduler.kv_cache_manager.num_free_blocks == 63
    assert scheduler.get_request("a") is None
    # the finished id is reported once, in the next step
    assert scheduler.schedule().finished_req_ids == ["a"]
    assert scheduler.schedule().finished_req_ids == []


def test_chunked_prefill_shares_the_step_with_decodes():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    scheduler.add_request(make_request("short", range(5), max_tokens=10))
    output, _ = step(scheduler)
    assert plan(output) == [("short", 0, 5, True)]
    scheduler.add_request(make_request("long", range(100, 140), max_tokens=2))
    output, result = step(scheduler)
    assert plan(output) == [("short", 5, 1, True), ("long", 0, 15, False)]
    assert [o.request_id for o in result.outputs] == ["short"]
    output, _ = step(scheduler)
    assert plan(output) == [("short", 6, 1, True), ("long", 15, 15, False)]
    output, result = step(scheduler)
    assert plan(output) == [("short", 7, 1, True), ("long", 30, 10, True)]
    assert output.total_num_scheduled_tokens == 11
    assert [o.request_id for o in result.outputs] == ["short", "long"]


def test_long_prefill_threshold_caps_prompts_only_beside_decodes():
    scheduler = make_scheduler(max_num_batched_tokens=32, long_prefill_token_threshold=4)
    scheduler.add_request(make_request("a", range(20), max_tokens=10))
    scheduler.add_request(make_request("b", range(100, 106), max_tokens=10))
    output, _ = step(scheduler)
    # nothing decodes yet: prompts arriving together prefill at the full budget
    assert plan(output) == [("a", 0, 20, True), ("b", 0, 6, True)]
    scheduler.add_request(make_request("c", range(200, 210), max_tokens=2))
    output, _ = step(scheduler)
    # a and b decode: c's prompt goes 4 tokens a step, so their streams never wait long
    assert plan(output) == [("a", 20, 1, True), ("b", 6, 1, True), ("c", 0, 4, False)]
    output, _ = step(scheduler)
    assert plan(output) == [("a", 21, 1, True), ("b", 7, 1, True), ("c", 4, 4, False)]
    output, _ = step(scheduler)
    assert plan(output) == [("a", 22, 1, True), ("b", 8, 1, True), ("c", 8, 2, True)]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"long_prefill_token_threshold": -1}, "long_prefill_token_threshold"),
        (
            {"long_prefill_token_threshold": 8, "enable_chunked_prefill": False},
            "long_prefill_token_threshold needs enable_chunked_prefill",
        ),
    ],
)
def test_long_prefill_threshold_is_validated(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**kwargs)


def test_budget_and_max_num_seqs_are_respected():
    scheduler = make_scheduler(max_num_batched_tokens=20, max_num_seqs=3)
    for i in range(5):
        scheduler.add_request(make_request(f"r{i}", range(100 * i, 100 * i + 6)))
    output = scheduler.schedule()
    # 6 + 6 + 6 = 18 tokens, then 2 left for r3: but r3 would be the 4th sequence
    assert plan(output) == [("r0", 0, 6, True), ("r1", 0, 6, True), ("r2", 0, 6, True)]
    assert len(scheduler.waiting) == 2
    scheduler.update_from_output(output, sample_all(output))
    output = scheduler.schedule()
    assert [s.request.request_id for s in output.scheduled] == ["r0", "r1", "r2"]


def test_not_chunked_waits_for_a_step_with_room_for_the_whole_prompt():
    scheduler = make_scheduler(max_num_batched_tokens=16, enable_chunked_prefill=False)
    scheduler.add_request(make_request("a", range(10)))
    scheduler.add_request(make_request("b", range(100, 110)))
    output, _ = step(scheduler)
    assert plan(output) == [("a", 0, 10, True)]
    output, _ = step(scheduler)
    assert plan(output) == [("a", 10, 1, True), ("b", 0, 10, True)]


def test_siblings_in_the_same_step_share_the_prompt_blocks():
    scheduler = make_scheduler()
    prompt = list(range(30, 43))  # 13 tokens: 3 full blocks
    for i in range(3):
        scheduler.add_request(make_request(f"s{i}", prompt))
    output = scheduler.schedule()
    assert plan(output) == [("s0", 0, 13, True), ("s1", 12, 1, True), ("s2", 12, 1, True)]
    assert [s.block_ids for s in output.scheduled] == [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 6]]
    result = scheduler.update_from_output(output, sample_all(output))
    assert [o.num_cached_tokens for o in result.outputs] == [0, 12, 12]
    stats = result.scheduler_stats
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (39, 24)
    assert stats.num_used_blocks == 6 and stats.num_total_blocks == 63


def test_prefix_hit_after_the_first_request_finished():
    scheduler = make_scheduler()
    prompt = list(range(9))
    scheduler.add_request(make_request("a", prompt, max_tokens=1))
    step(scheduler)
    assert not scheduler.has_unfinished_requests()
    scheduler.add_request(make_request("b", prompt, max_tokens=1))
    output, result = step(scheduler)
    assert plan(output) == [("b", 8, 1, True)]
    assert output.scheduled[0].block_ids[:2] == [1, 2]
    assert result.outputs[0].num_cached_tokens == 8


def test_preemption_requeues_at_the_front_and_the_request_later_finishes():
    # 6 usable blocks of 4 tokens
    scheduler = make_scheduler(num_blocks=7, max_num_batched_tokens=64)
    a = make_request("a", range(8), max_tokens=8)
    b = make_request("b", range(100, 108), max_tokens=8)
    c = make_request("c", range(200, 204), max_tokens=1)
    scheduler.add_request(a)
    scheduler.add_request(b)
    output, _ = step(scheduler)  # a: blocks 1,2  b: blocks 3,4
    assert [s.block_ids for s in output.scheduled] == [[1, 2], [3, 4]]
    scheduler.add_request(c)
    output, _ = step(scheduler)  # a, b decode into blocks 5, 6: c cannot fit
    assert plan(output) == [("a", 8, 1, True), ("b", 8, 1, True)]
    assert [r.request_id for r in scheduler.waiting] == ["c"]
    for _ in range(3):
        step(scheduler)
    # 12 tokens each, all 6 blocks used: a's next token needs a 7th block -> b is preempted
    output, _ = step(scheduler)
    assert output.preempted_req_ids == ["b"]
    assert plan(output) == [("a", 12, 1, True)]
    assert b.status == RequestStatus.PREEMPTED
    assert b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert [r.request_id for r in scheduler.waiting] == ["b", "c"]
    assert scheduler.make_stats().num_preemptions == 1
    for _ in range(40):
        if not scheduler.has_unfinished_requests():
            break
        step(scheduler)
    assert not scheduler.has_unfinished_requests()
    assert a.output_token_ids == [7] * 8 and b.output_token_ids == [7] * 8
    assert c.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert scheduler.kv_cache_manager.num_free_blocks == 6
    # num_cached_tokens is set at the first scheduling only (no hit then)
    assert b.num_cached_tokens == 0
    # b's recompute hit its own full blocks, still cached after the preemption
    assert scheduler.make_stats().prefix_cache_hits >= 8


def test_preempted_request_recomputes_from_the_prefix_cache():
    scheduler = make_scheduler(num_blocks=5, max_num_batched_tokens=64)  # 4 usable blocks
    a = make_request("a", range(8), max_tokens=4)
    b = make_request("b", range(100, 107), max_tokens=4)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler)  # a: [1, 2]; b: [3, 4], 7 tokens
    output, _ = step(scheduler)  # a needs a 5th block: b (last admitted) is preempted
    assert output.preempted_req_ids == ["b"]
    # b's full block 3 kept its hash; block 4 (partial) was never cached
    hit_ids, num_hit = scheduler.kv_cache_manager.get_computed_blocks(b)
    assert (hit_ids, num_hit) == ([3], 4)


def test_fcfs_refuses_a_priority_it_would_ignore():
    scheduler = make_scheduler(policy="fcfs")
    with pytest.raises(ValueError, match="^priority=3 needs scheduling_policy='priority'"):
        scheduler.add_request(make_request("p", range(4), priority=3))
    assert not scheduler.requests and len(scheduler.waiting) == 0  # nothing taken
    scheduler.add_request(make_request("z", range(4), priority=0))
    # urgent requests (health probes) keep their own priority under any policy
    scheduler.add_request(make_request("probe", range(4), priority=-5), urgent=True)
    assert {r.request_id for r in scheduler.waiting} == {"z", "probe"}


def test_priority_policy_admits_by_priority_then_arrival():
    scheduler = make_scheduler(policy="priority", max_num_seqs=1)
    scheduler.add_request(make_request("late_low", range(4), priority=5, arrival_time=1.0))
    scheduler.add_request(make_request("high", range(4), priority=0, arrival_time=3.0))
    scheduler.add_request(make_request("early_low", range(4), priority=5, arrival_time=0.0))
    order = []
    for _ in range(20):
        output, _ = step(scheduler)
        for s in output.scheduled:
            if s.request.request_id not in order:
                order.append(s.request.request_id)
        if not scheduler.has_unfinished_requests():
            break
    assert order == ["high", "early_low", "late_low"]


def test_priority_policy_preempts_the_lowest_priority_request():
    scheduler = make_scheduler(num_blocks=5, policy="priority")  # 4 usable blocks
    low = make_request("low", range(8), priority=9, arrival_time=0.0, max_tokens=4)
    high = make_request("high", range(100, 108), priority=1, arrival_time=1.0, max_tokens=4)
    scheduler.add_request(low)
    scheduler.add_request(high)
    output, _ = step(scheduler)
    assert [s.request.request_id for s in output.scheduled] == ["high", "low"]
    output, _ = step(scheduler)  # both need a 3rd block; only "low" goes
    assert output.preempted_req_ids == ["low"]
    assert plan(output) == [("high", 8, 1, True)]


def test_priority_preemption_of_a_request_scheduled_earlier_in_the_step():
    scheduler = make_scheduler(num_blocks=6, policy="priority")  # 5 usable blocks
    low = make_request("low", range(4), priority=9, arrival_time=0.0, max_tokens=8)
    high = make_request("high", range(100, 105), priority=1, arrival_time=1.0, max_tokens=8)
    scheduler.add_request(low)
    step(scheduler)  # low: block 1
    scheduler.add_request(high)
    output, _ = step(scheduler)  # low decodes into block 2, high prefills into 3, 4
    assert plan(output) == [("low", 4, 1, True), ("high", 0, 5, True)]
    assert [s.block_ids for s in output.scheduled] == [[1, 2], [3, 4]]
    for _ in range(3):
        step(scheduler)
    # both reach position 8: low (first in the running list) takes the last free block, then
    # high needs one too, and low, already scheduled this step, is the victim
    output, _ = step(scheduler)
    assert output.preempted_req_ids == ["low"]
    assert plan(output) == [("high", 8, 1, True)]
    assert output.scheduled[0].block_ids == [3, 4, 5]
    assert output.total_num_scheduled_tokens == 1
    assert low.num_computed_tokens == 0 and low.status == RequestStatus.PREEMPTED
    # its full blocks stay cached for the recompute
    assert scheduler.kv_cache_manager.get_computed_blocks(low) == ([1, 2], 8)
    for _ in range(30):
        if not scheduler.has_unfinished_requests():
            break
        step(scheduler)
    assert len(low.output_token_ids) == 8 and len(high.output_token_ids) == 8


def test_abort_frees_blocks_and_ignores_unknown_ids():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("run", range(10)))
    step(scheduler)
    scheduler.add_request(make_request("wait", range(10)))
    assert scheduler.kv_cache_manager.num_free_blocks == 60
    scheduler.abort_requests(["run", "wait", "unknown"])
    scheduler.abort_requests("run")  # already finished: ignored
    assert scheduler.kv_cache_manager.num_free_blocks == 63
    assert not scheduler.has_unfinished_requests()
    assert scheduler.get_num_unfinished_requests() == 0
    assert sorted(scheduler.schedule().finished_req_ids) == ["run", "wait"]


def test_abort_between_schedule_and_update_drops_the_token():
    scheduler = make_scheduler()
    request = make_request("a", range(5))
    scheduler.add_request(request)
    output = scheduler.schedule()
    scheduler.abort_requests(["a"])
    result = scheduler.update_from_output(output, sample_all(output))
    assert result.outputs == [] and request.output_token_ids == []
    assert request.status == RequestStatus.FINISHED_ABORTED


def test_finish_requests_for_a_stop_string():
    scheduler = make_scheduler()
    request = make_request("a", range(5))
    scheduler.add_request(request)
    step(scheduler)
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_STOPPED, stop_reason="###")
    assert request.finish_reason == FinishReason.STOP and request.stop_reason == "###"
    assert scheduler.kv_cache_manager.num_free_blocks == 63
    with pytest.raises(ValueError, match="finished status"):
        scheduler.finish_requests(["a"], RequestStatus.RUNNING)


def test_duplicate_request_id_is_refused():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", range(3)))
    with pytest.raises(ValueError, match="request_id"):
        scheduler.add_request(make_request("a", range(3)))


def test_eos_stops_unless_ignored_or_before_min_tokens():
    scheduler = make_scheduler()
    plain = make_request("plain", range(3), max_tokens=5)
    ignoring = make_request("ignoring", range(3), max_tokens=2, ignore_eos=True)
    min_two = make_request("min_two", range(3), max_tokens=5, min_tokens=2)
    for request in (plain, ignoring, min_two):
        scheduler.add_request(request)
    _, result = step(scheduler, token_id=EOS)
    finished = {o.request_id: (o.finish_reason, o.stop_reason) for o in result.outputs}
    assert finished == {"plain": (FinishReason.STOP, None), "ignoring": (None, None),
                        "min_two": (None, None)}  # fmt: skip
    _, result = step(scheduler, token_id=EOS)
    finished = {o.request_id: o.finish_reason for o in result.outputs}
    assert finished == {"ignoring": FinishReason.LENGTH, "min_two": FinishReason.STOP}


def test_stop_token_ids_set_the_stop_reason():
    scheduler = make_scheduler()
    request = make_request("a", range(3), max_tokens=5, stop_token_ids=[42])
    scheduler.add_request(request)
    _, result = step(scheduler, token_id=42)
    assert (result.outputs[0].finish_reason, result.outputs[0].stop_reason) == (
        FinishReason.STOP,
        42,
    )
    assert request.status == RequestStatus.FINISHED_STOPPED


def test_max_model_len_caps_the_sequence():
    scheduler = make_scheduler(max_model_len=8)
    request = make_request("a", range(6), max_tokens=10)
    scheduler.add_request(request)
    step(scheduler)
    _, result = step(scheduler)
    assert request.num_tokens == 8
    assert result.outputs[0].finish_reason == FinishReason.LENGTH


def test_logprobs_are_passed_through():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", range(3)))
    output = scheduler.schedule()
    lp = TokenLogprobs(token_id=7, logprob=-0.5, rank=1, top=[(7, -0.5)])
    result = scheduler.update_from_output(output, sample_all(output, logprobs={"a": lp}))
    assert result.outputs[0].new_logprobs == [lp]


def test_stats_and_reset_prefix_cache():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", range(8), max_tokens=2))
    scheduler.add_request(make_request("b", range(8), max_tokens=2))
    scheduler.schedule()
    stats = scheduler.make_stats()
    assert (stats.num_running_reqs, stats.num_waiting_reqs) == (2, 0)
    assert stats.num_used_blocks == 3  # a: 1, 2; b: hit 1, new 3
    assert stats.kv_cache_usage == pytest.approx(3 / 63)
    assert scheduler.reset_prefix_cache() is False
    scheduler.abort_requests(["a", "b"])
    assert scheduler.reset_prefix_cache() is True
    assert scheduler.make_stats().kv_cache_usage == 0.0


def test_prefix_caching_disabled_gives_no_hits():
    scheduler = make_scheduler(enable_prefix_caching=False)
    scheduler.add_request(make_request("a", range(9)))
    scheduler.add_request(make_request("b", range(9)))
    output, result = step(scheduler)
    assert plan(output) == [("a", 0, 9, True), ("b", 0, 9, True)]
    assert [o.num_cached_tokens for o in result.outputs] == [0, 0]
