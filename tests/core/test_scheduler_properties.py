"""Property test: random add / step / abort sequences keep the block bookkeeping exact.

A fake device records, per KV slot, which token prefix wrote it; every step checks that each
scheduled request reads exactly its own prefix through its block table. That catches wrong
prefix hits, hits on KV never written (preemption in the scheduling step), and salt leaks.
"""

import random
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxserve.config import CacheConfig, SchedulerConfig
from jaxserve.core.outputs import ModelRunnerOutput
from jaxserve.core.scheduler import Scheduler
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling_params import SamplingParams

BLOCK_SIZE = 4
MAX_MODEL_LEN = 32
EOS = 2
STOP_ID = 3
# shared prompt beginnings, so prefix hits (and same-step sibling hits) happen often
PREFIXES = [list(range(10, 22)), list(range(30, 39)), [5] * 8]

add_op = st.tuples(
    st.just("add"),
    st.sampled_from([None, 0, 1, 2]),  # which shared prefix, if any
    st.integers(0, 10),  # suffix length
    st.integers(1, 24),  # max_tokens
    st.sampled_from([None, None, "s1", "s2"]),  # cache_salt
    st.integers(0, 3),  # priority
    st.integers(0, 3),  # number of identical copies added together (n > 1 siblings)
)
step_op = st.tuples(st.just("step"), st.integers(1, 4))
abort_op = st.tuples(st.just("abort"), st.integers(0, 1000))
operations = st.lists(
    st.one_of(add_op, add_op, step_op, step_op, abort_op), min_size=4, max_size=40
)
configs = st.fixed_dictionaries(
    {
        "num_blocks": st.integers(9, 14),  # >= 9: any request (<= 32 tokens) fits alone
        "max_num_batched_tokens": st.integers(1, 40),
        "max_num_seqs": st.integers(1, 6),
        "policy": st.sampled_from(["fcfs", "priority"]),
        "enable_prefix_caching": st.booleans(),
        "enable_chunked_prefill": st.booleans(),
    }
)


class FakeDevice:
    """The KV cache as contents: slot -> (cache_salt, the token prefix that wrote it).

    Under async scheduling a decode's input token is the one the previous step sampled, which
    the host does not know yet: the device takes it from its own last output, as the runner's
    step does.
    """

    def __init__(self) -> None:
        self.slots: dict[tuple[int, int], tuple] = {}
        # req_id -> the token the last executed step sampled for it
        self.last_sampled: dict[str, int] = {}

    def execute(self, output, rng: random.Random) -> ModelRunnerOutput:
        def content(request, pos):
            tokens = request.all_token_ids[: pos + 1]
            if pos == len(request.all_token_ids):  # in flight: on the device only
                tokens = [*tokens, self.last_sampled[request.request_id]]
            assert len(tokens) == pos + 1, (request, pos)
            return (request.cache_salt, tuple(tokens))

        # every write of the step lands before any read (as the runner does, layer by layer)
        for s in output.scheduled:
            for pos in range(s.num_computed_tokens, s.num_computed_tokens + s.num_scheduled_tokens):
                slot = (s.block_ids[pos // BLOCK_SIZE], pos % BLOCK_SIZE)
                assert slot[0] != 0, "a real token was written to the null block"
                self.slots[slot] = content(s.request, pos)
        for s in output.scheduled:
            for pos in range(s.num_computed_tokens + s.num_scheduled_tokens):
                slot = (s.block_ids[pos // BLOCK_SIZE], pos % BLOCK_SIZE)
                assert self.slots.get(slot) == content(s.request, pos), (s.request, pos)
        tokens = {}
        for s in output.scheduled:
            if s.is_sampling:
                # mostly ordinary tokens, so requests live long enough to run out of blocks
                stop = rng.random() < 0.05
                tokens[s.request.request_id] = rng.choice([EOS, STOP_ID] if stop else range(40, 48))
        self.last_sampled = tokens
        return ModelRunnerOutput(sampled_token_ids=tokens)


def check_invariants(scheduler: Scheduler) -> None:
    kv = scheduler.kv_cache_manager
    pool = kv.block_pool
    held = Counter()
    for req_id, request in scheduler.requests.items():
        blocks = kv.req_to_blocks.get(req_id, [])
        if request.status != RequestStatus.RUNNING:
            assert not blocks, f"{request} holds blocks while not running"
            continue
        assert kv.get_block_ids(req_id) == [b.block_id for b in blocks]
        assert len(blocks) * BLOCK_SIZE >= request.num_computed_tokens
        held.update(b.block_id for b in blocks)
    assert set(kv.req_to_blocks) <= set(scheduler.requests)
    free = [b.block_id for b in pool.free_block_queue]
    assert len(free) == len(set(free)) == pool.get_num_free_blocks()
    assert 0 not in held and 0 not in free and pool.null_block.ref_cnt == 0
    assert not set(free) & set(held)
    assert len(free) + len(held) == pool.num_blocks - 1
    for block in pool.blocks[1:]:
        assert block.ref_cnt == held[block.block_id], block
    for block_hash, block in pool.cached_block_hash_to_block.items():
        assert block.block_hash == block_hash
    num_running = len(scheduler.running)
    assert num_running == len({r.request_id for r in scheduler.running})
    assert num_running <= scheduler.scheduler_config.max_num_seqs
    assert num_running + len(scheduler.waiting) == len(scheduler.requests)


class Driver:
    """Steps the scheduler as EngineCore does; pipelined: step k+1 is scheduled and executed
    before step k's tokens are given to update_from_output (async scheduling)."""

    def __init__(self, scheduler: Scheduler, pipelined: bool) -> None:
        self.scheduler = scheduler
        self.pipelined = pipelined
        self.device = FakeDevice()
        # (the scheduled step, its tokens) not applied yet
        self.pending: tuple | None = None

    @property
    def has_work(self) -> bool:
        return self.pending is not None or self.scheduler.has_unfinished_requests()

    def step(self, rng: random.Random) -> None:
        pending, self.pending = self.pending, None
        launched = None
        if self.scheduler.has_unfinished_requests():
            output = schedule_checked(self.scheduler)
            launched = (output, self.device.execute(output, rng))
        if pending is not None:
            self.scheduler.update_from_output(*pending)
            check_invariants(self.scheduler)
        if launched is not None:
            if self.pipelined:
                self.pending = launched
            else:
                self.scheduler.update_from_output(*launched)
                check_invariants(self.scheduler)


def schedule_checked(scheduler: Scheduler):
    config = scheduler.scheduler_config
    output = scheduler.schedule()
    assert output.total_num_scheduled_tokens == sum(
        s.num_scheduled_tokens for s in output.scheduled
    )
    assert output.total_num_scheduled_tokens <= config.max_num_batched_tokens
    assert len(output.scheduled) <= config.max_num_seqs
    assert len({s.request.request_id for s in output.scheduled}) == len(output.scheduled)
    for s in output.scheduled:
        request = s.request
        assert s.num_scheduled_tokens > 0
        assert s.num_computed_tokens + s.num_scheduled_tokens <= MAX_MODEL_LEN
        # (this step's own sample is counted as a placeholder already)
        in_flight_before = request.num_output_placeholders - s.is_sampling
        assert in_flight_before in (0, 1)
        assert s.is_sampling == (
            s.num_computed_tokens + s.num_scheduled_tokens == request.num_tokens + in_flight_before
        )
        # never past the output a request may have
        assert request.num_output_tokens + request.num_output_placeholders <= request.max_tokens
    check_invariants(scheduler)
    return output


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=configs,
    ops=operations,
    rng=st.randoms(use_true_random=False),
    pipelined=st.booleans(),
)
def test_random_workloads_keep_blocks_consistent_and_finish(config, ops, rng, pipelined):
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_batched_tokens=config["max_num_batched_tokens"],
            max_num_seqs=config["max_num_seqs"],
            max_model_len=MAX_MODEL_LEN,
            scheduling_policy=config["policy"],
            enable_chunked_prefill=config["enable_chunked_prefill"],
        ),
        CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=config["enable_prefix_caching"]),
        config["num_blocks"],
    )
    driver = Driver(scheduler, pipelined)
    added: dict[str, Request] = {}
    aborted: set[str] = set()
    for op in ops:
        if op[0] == "add":
            _, prefix, suffix_len, max_tokens, salt, priority, num_copies = op
            prompt = (PREFIXES[prefix] if prefix is not None else []) + [
                rng.randrange(40, 60) for _ in range(suffix_len)
            ]
            prompt = prompt[:MAX_MODEL_LEN] or [40]
            for _ in range(num_copies + 1):
                req_id = f"r{len(added)}"
                request = Request(
                    req_id,
                    prompt,
                    SamplingParams(max_tokens=max_tokens, stop_token_ids=[STOP_ID]),
                    eos_token_id=EOS,
                    sampling_seed=0,
                    arrival_time=float(len(added)),
                    # fcfs refuses a priority it would ignore
                    priority=priority if config["policy"] == "priority" else 0,
                    cache_salt=salt,
                    max_tokens=max_tokens,
                )
                scheduler.add_request(request)
                added[req_id] = request
        elif op[0] == "step":
            for _ in range(op[1]):
                driver.step(rng)
        else:
            if added:
                req_id = f"r{op[1] % len(added)}"
                if not added[req_id].is_finished:
                    aborted.add(req_id)
                scheduler.abort_requests([req_id])
                check_invariants(scheduler)

    # every request still running must finish within a bounded number of steps
    for _ in range(2000):
        if not driver.has_work:
            break
        driver.step(rng)
    assert not driver.has_work
    for req_id, request in added.items():
        if req_id in aborted:
            assert request.status == RequestStatus.FINISHED_ABORTED
        else:
            assert request.status in (
                RequestStatus.FINISHED_STOPPED,
                RequestStatus.FINISHED_LENGTH_CAPPED,
            ), request
            assert 1 <= request.num_output_tokens <= request.max_tokens
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_blocks - 1
    assert all(block.ref_cnt == 0 for block in pool.blocks)
    assert scheduler.reset_prefix_cache()
