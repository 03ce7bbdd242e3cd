"""The persistent InputBatch: rows kept between steps stage exactly what a fresh batch stages."""

from __future__ import annotations

import dataclasses
import random

import jax
import numpy as np
import pytest

from jaxserve.core.outputs import ScheduledRequest, SchedulerOutput
from jaxserve.request import Request
from jaxserve.runner.buckets import Buckets
from jaxserve.runner.input_batch import InputBatch
from jaxserve.runner.sampler_inputs import build_step_inputs
from jaxserve.runner.sampling_metadata import SamplingRow, build_sampling_metadata, penalty_width
from jaxserve.sampling_params import SamplingParams

BLOCK = 4
BUCKETS = Buckets.make(64, 8, 64, BLOCK)
PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7, top_k=5, top_p=0.9, logprobs=2),
    SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[7]),
    SamplingParams(temperature=0.5, logit_bias={3: 2.0, 9: -1.5}),
    SamplingParams(temperature=0.9, presence_penalty=0.5, repetition_penalty=1.2),
]


class _Sim:
    """Requests that join, grow (prefill chunks, then decodes), take blocks, and leave."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.live: dict[str, tuple[Request, list[int]]] = {}
        self.next_id = 0
        self.next_block = 1

    def _blocks_for(self, blocks: list[int], tokens: int) -> list[int]:
        while len(blocks) * BLOCK < tokens:
            blocks.append(self.next_block)
            self.next_block += 1
        return blocks

    def step(self) -> list[ScheduledRequest]:
        rng = self.rng
        for rid in [r for r in self.live if rng.random() < 0.15]:
            del self.live[rid]  # finished or preempted
        for rid in list(self.live):
            if rng.random() < 0.05:  # preempted and back at once: a new block table
                request, _ = self.live[rid]
                request.num_computed_tokens = 0
                self.live[rid] = (request, [])
        while len(self.live) < 8 and rng.random() < 0.5:
            rid = f"r{self.next_id}"
            self.next_id += 1
            prompt = [rng.randrange(1, 50) for _ in range(rng.randrange(1, 14))]
            params = rng.choice(PARAMS)
            request = Request(
                rid, prompt, params, None, sampling_seed=rng.randrange(2**40), max_tokens=64
            )
            self.live[rid] = (request, [])
        scheduled = []
        for rid in rng.sample(list(self.live), len(self.live)):  # the scheduler's order varies
            request, blocks = self.live[rid]
            if rng.random() < 0.1:
                continue  # no budget for it this step: it leaves the batch
            start = request.num_computed_tokens
            n = min(request.num_tokens - start, rng.randrange(1, 6))
            self._blocks_for(blocks, start + n)
            sampling = start + n == request.num_tokens
            scheduled.append(ScheduledRequest(request, start, n, blocks, sampling))
        for sr in scheduled:
            sr.request.num_computed_tokens = sr.num_computed_tokens + sr.num_scheduled_tokens
        return scheduled

    def land(self, scheduled: list[ScheduledRequest]) -> None:
        """The step's samples join their requests' history."""
        for sr in scheduled:
            if sr.is_sampling:
                sr.request.append_output_token_ids(self.rng.randrange(1, 50))


def _assert_same_leaves(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_same(a, b) -> None:
    _assert_same_leaves(a, b)
    assert (a.num_tokens, a.num_reqs, a.num_blocks_per_req) == (
        b.num_tokens,
        b.num_reqs,
        b.num_blocks_per_req,
    )


@pytest.mark.parametrize("seed", range(6))
def test_kept_rows_stage_what_a_fresh_batch_stages(seed):
    sim = _Sim(seed)
    batch = InputBatch(BUCKETS.max_num_reqs, BUCKETS.max_blocks_per_req)
    steps = 0
    while steps < 40:
        scheduled = sim.step()
        if not scheduled:
            continue
        steps += 1
        kept = build_step_inputs(SchedulerOutput(scheduled, 0), BUCKETS, BLOCK, 64, batch=batch)
        assert kept.failed == {}
        # a fresh batch stages rows in the order given: the kept batch's row order
        fresh = build_step_inputs(SchedulerOutput(kept.staged, 0), BUCKETS, BLOCK, 64)
        assert [sr.request for sr in fresh.staged] == [sr.request for sr in kept.staged]
        _assert_same(kept.inputs, fresh.inputs)
        _assert_same_leaves(kept.sampling, fresh.sampling)
        # and the sampling rows are what build_sampling_metadata makes of each request alone
        # (rows that do not sample this step are padding)
        rows = [
            SamplingRow.from_request(
                sr.request,
                sr.num_computed_tokens + sr.num_scheduled_tokens - len(sr.request.prompt_token_ids),
            )
            if sr.is_sampling
            else None
            for sr in kept.staged
        ]
        width = penalty_width(kept.inputs.num_blocks_per_req, BLOCK, 64)
        _assert_same_leaves(
            kept.sampling, build_sampling_metadata(rows, kept.inputs.num_reqs, width)
        )
        assert batch.num_rows == len(scheduled)
        assert {sr.request.request_id for sr in scheduled} == set(batch.row_of)
        sim.land(scheduled)


def _decode(request: Request, blocks: list[int]) -> ScheduledRequest:
    sr = ScheduledRequest(request, request.num_tokens - 1, 1, blocks, True)
    return sr


def test_a_row_changes_only_when_its_request_comes_goes_or_grows():
    reqs = [
        Request(f"r{i}", [1, 2, 3], PARAMS[i], None, sampling_seed=i, max_tokens=8)
        for i in range(3)
    ]
    tables = [[10 + i] for i in range(3)]
    batch = InputBatch(BUCKETS.max_num_reqs, BUCKETS.max_blocks_per_req)
    first = build_step_inputs(
        SchedulerOutput([_decode(r, t) for r, t in zip(reqs, tables, strict=True)], 3),
        BUCKETS,
        BLOCK,
        64,
        batch=batch,
    )
    rows = dict(batch.row_of)
    snapshot = [a.copy() for a in (batch.block_table, batch.floats, batch.ints, batch.seeds)]
    # the same requests, another order: nothing is written, nobody moves
    order = [2, 0, 1]
    again = build_step_inputs(
        SchedulerOutput([_decode(reqs[i], tables[i]) for i in order], 3),
        BUCKETS,
        BLOCK,
        64,
        batch=batch,
    )
    assert batch.row_of == rows
    assert [sr.request.request_id for sr in again.staged] == ["r0", "r1", "r2"]
    for a, b in zip(
        snapshot, (batch.block_table, batch.floats, batch.ints, batch.seeds), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # the step's arrays are copies: a later write to the batch leaves them alone
    for leaf in jax.tree.leaves((first.inputs, first.sampling)):
        for kept in (batch.block_table, batch.floats, batch.ints, batch.seeds):
            assert not np.shares_memory(np.asarray(leaf), kept)
    # r0 grows a block, r1 leaves: r2 (the last row) moves into r1's row, r0 keeps its own
    tables[0].append(20)
    reqs[0].append_output_token_ids([4, 5])
    build_step_inputs(
        SchedulerOutput([_decode(reqs[0], tables[0]), _decode(reqs[2], tables[2])], 2),
        BUCKETS,
        BLOCK,
        64,
        batch=batch,
    )
    assert batch.row_of == {"r0": 0, "r2": 1}
    assert batch.block_table[0, :3].tolist() == [10, 20, 0]
    assert batch.block_table[1, :2].tolist() == [12, 0]
    np.testing.assert_array_equal(batch.floats[:, 1], snapshot[1][:, 2])
    # the freed last row is padding again
    assert batch.block_table[2].sum() == 0 and batch.seeds[2] == 0
    np.testing.assert_array_equal(batch.floats[:, 2], snapshot[1][:, 3])


def test_a_request_whose_values_cannot_be_staged_takes_no_row():
    ok = Request("ok", [1, 2], PARAMS[0], None, sampling_seed=0, max_tokens=8)
    bad_params = dataclasses.replace(PARAMS[0])
    object.__setattr__(bad_params, "top_k", 3_000_000_000)
    bad = Request("bad", [1, 2], bad_params, None, sampling_seed=0, max_tokens=8)
    batch = InputBatch(BUCKETS.max_num_reqs, BUCKETS.max_blocks_per_req)
    out = SchedulerOutput([_decode(bad, [3]), _decode(ok, [4])], 2)
    staged = build_step_inputs(out, BUCKETS, BLOCK, 64, batch=batch)
    assert list(staged.failed) == ["bad"] and batch.row_of == {"ok": 0}
    assert staged.inputs.attn.block_tables[0, 0] == 4
