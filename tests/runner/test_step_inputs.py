"""StepInputs staging on its own: bucket selection and the flat ragged batch, exact arrays."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.core.outputs import ScheduledRequest, SchedulerOutput
from jaxserve.request import Request
from jaxserve.runner.buckets import Buckets
from jaxserve.runner.sampler_inputs import build_step_inputs
from jaxserve.runner.step_inputs import dummy_step_inputs
from jaxserve.sampling_params import SamplingParams

BLOCK = 4


def _request(rid: str, ids: list[int], output: list[int] = ()) -> Request:
    r = Request(rid, ids, SamplingParams(), None, sampling_seed=0, max_tokens=8)
    r.append_output_token_ids(list(output))
    return r


def test_buckets_are_powers_of_two_capped_by_the_config():
    b = Buckets.make(max_num_batched_tokens=96, max_num_seqs=8, max_model_len=100, block_size=4)
    assert b.token_sizes == (16, 32, 64, 96)
    assert b.block_sizes == (4, 8, 16, 25)  # 25 blocks cover 100 tokens
    assert b.select(1, 1) == (16, 8, 4)
    assert b.select(17, 5) == (32, 8, 8)
    assert b.select(96, 25) == (96, 8, 25)
    assert [b.num_reqs_for(t) for t in (1, 3, 5, 16)] == [1, 4, 8, 8]
    assert len(b.all_shapes()) == 16 and (16, 8, 4) in b.all_shapes()
    with pytest.raises(StopIteration):  # past the last bucket: the scheduler never asks
        b.select(97, 1)


def test_decode_and_prefill_chunk_in_one_batch():
    decode = _request("d", [11, 12, 13, 14, 15], output=[16])  # 6 tokens, 5 computed
    prefill = _request("p", [21, 22, 23, 24, 25, 26, 27])  # a 3-token chunk from position 2
    out = SchedulerOutput(
        scheduled=[
            ScheduledRequest(decode, 5, 1, block_ids=[7, 3], is_sampling=True),
            ScheduledRequest(prefill, 2, 3, block_ids=[9, 2], is_sampling=False),
        ],
        total_num_scheduled_tokens=4,
    )
    buckets = Buckets.make(32, 4, 64, BLOCK)
    staged = build_step_inputs(out, buckets, BLOCK, penalty_len=8)
    assert staged.failed == {} and [sr.request.request_id for sr in staged.staged] == ["d", "p"]
    s = staged.inputs
    assert (s.num_tokens, s.num_reqs, s.num_blocks_per_req) == (16, 4, 4)
    pad = [0] * 12
    assert s.input_ids.tolist() == [16, 23, 24, 25, *pad]
    assert s.positions.tolist() == [5, 2, 3, 4, *pad]
    # slot = block_id * block_size + offset: position 5 is block 3 offset 1; 2,3 block 9; 4 block 2
    assert s.attn.slot_mapping.tolist() == [13, 38, 39, 8, *pad]
    assert s.attn.token_req_idx.tolist() == [0, 1, 1, 1, *pad]
    assert s.attn.block_tables.tolist() == [[7, 3, 0, 0], [9, 2, 0, 0], [0] * 4, [0] * 4]
    assert s.attn.kv_lens.tolist() == [6, 5, 0, 0]
    # rows past the real requests repeat the total, so they hold zero queries
    assert s.attn.cu_q_lens.tolist() == [0, 1, 4, 4, 4]
    assert s.logits_indices.tolist() == [0, 3, 0, 0]
    for a in (s.input_ids, s.positions, s.attn.slot_mapping, s.attn.block_tables):
        assert a.dtype == np.int32


def test_a_request_short_of_blocks_or_tokens_fails_alone():
    ok = _request("ok", [11, 12, 13])
    short_blocks = _request("b", [21, 22, 23, 24, 25])  # 5 tokens need 2 blocks of 4
    short_tokens = _request("t", [31, 32])  # 3 tokens scheduled, 2 there
    out = SchedulerOutput(
        scheduled=[
            ScheduledRequest(short_blocks, 0, 5, block_ids=[5], is_sampling=True),
            ScheduledRequest(ok, 0, 3, block_ids=[7], is_sampling=True),
            ScheduledRequest(short_tokens, 0, 3, block_ids=[9], is_sampling=True),
        ],
        total_num_scheduled_tokens=11,
    )
    staged = build_step_inputs(out, Buckets.make(32, 4, 64, BLOCK), BLOCK, penalty_len=8)
    assert sorted(staged.failed) == ["b", "t"]
    assert [sr.request.request_id for sr in staged.staged] == ["ok"]
    assert staged.inputs.input_ids[:3].tolist() == [11, 12, 13]
    assert staged.inputs.attn.slot_mapping[:3].tolist() == [28, 29, 30]


def test_same_request_stages_the_same_whatever_its_batch_mates():
    # batch invariance starts here: a request's row depends on nothing but the request
    buckets = Buckets.make(32, 4, 64, BLOCK)
    alone_req = _request("a", [1, 2, 3])
    alone = build_step_inputs(
        SchedulerOutput([ScheduledRequest(alone_req, 0, 3, [5], True)], 3), buckets, BLOCK, 8
    ).inputs
    other = _request("o", [9, 9, 9, 9, 9])
    mixed = build_step_inputs(
        SchedulerOutput(
            [
                ScheduledRequest(other, 0, 5, [6, 8], True),
                ScheduledRequest(_request("a", [1, 2, 3]), 0, 3, [5], True),
            ],
            8,
        ),
        buckets,
        BLOCK,
        8,
    ).inputs
    assert mixed.input_ids[5:8].tolist() == alone.input_ids[:3].tolist()
    assert mixed.attn.slot_mapping[5:8].tolist() == alone.attn.slot_mapping[:3].tolist()
    assert mixed.attn.block_tables[1].tolist() == alone.attn.block_tables[0].tolist()


def test_dummy_step_writes_only_the_null_block():
    s = dummy_step_inputs((16, 4, 8))
    assert (s.num_tokens, s.num_reqs, s.num_blocks_per_req) == (16, 4, 8)
    assert s.input_ids.shape == (16,) and s.attn.block_tables.shape == (4, 8)
    assert not s.attn.slot_mapping.any() and not s.attn.block_tables.any()
