"""The sampler's staging phase on its own (runner/sampler_inputs.py): it runs after the forward
is staged, reads the requests' latest tokens, and fails a row alone without touching the
forward's arrays."""

from __future__ import annotations

import numpy as np

from jaxserve.core.outputs import ScheduledRequest, SchedulerOutput
from jaxserve.request import Request
from jaxserve.runner.buckets import Buckets
from jaxserve.runner.input_batch import InputBatch
from jaxserve.runner.sampler_inputs import stage_sampling
from jaxserve.runner.step_inputs import stage_forward
from jaxserve.sampling_params import SamplingParams

BLOCK = 4
BUCKETS = Buckets.make(32, 4, 64, BLOCK)
WIDTH = 4  # bitmask words per row


def _decode(rid: str, params: SamplingParams, prompt: list[int], output: list[int]):
    r = Request(rid, prompt, params, None, sampling_seed=0, max_tokens=8)
    r.append_output_token_ids(output)
    n = r.num_tokens
    return ScheduledRequest(
        r, n - 1, 1, block_ids=list(range(1, -(-n // BLOCK) + 1)), is_sampling=True
    )


def _forward(*scheduled: ScheduledRequest):
    batch = InputBatch(BUCKETS.max_num_reqs, BUCKETS.max_blocks_per_req)
    out = SchedulerOutput(list(scheduled), len(scheduled))
    return stage_forward(out, BUCKETS, BLOCK, batch=batch), batch


def test_penalty_ids_are_read_when_the_sampler_is_staged():
    """A token that lands between the two phases (async scheduling: the previous step read
    back) is in this step's penalty history."""
    pen = SamplingParams(temperature=0.0, repetition_penalty=1.3)
    sr = _decode("p", pen, [5, 6, 7], [8])
    staged, batch = _forward(sr)
    sr.request.append_output_token_ids([9])  # (the forward's own input stays as staged)
    assert stage_sampling(staged, batch, BLOCK, 64) == {}
    assert staged.sampling.penalty_token_ids[0, :6].tolist() == [5, 6, 7, 8, 9, -1]
    assert staged.inputs.input_ids[0] == 8


def test_a_fill_that_raises_fails_its_first_constrained_row_and_the_rest_go_on():
    plain = SamplingParams(temperature=0.5, seed=1)
    a, b, c = (_decode(rid, plain, [5, 6, 7], [8]) for rid in "abc")
    staged, batch = _forward(a, b, c)
    forward_ids = staged.inputs.input_ids.copy()
    calls = []

    def fill(rows, num_rows):
        calls.append([r.request_id if r is not None else None for r in rows])
        if rows[1] is not None:  # b's grammar breaks the fill while b is in it
            raise RuntimeError("injected fill failure")
        mask = np.zeros((num_rows, WIDTH), np.uint32)
        mask[0] = 1
        return mask, np.array([True] + [False] * (num_rows - 1))

    failed = stage_sampling(staged, batch, BLOCK, 64, bitmask_width=WIDTH, fill_mask=fill)
    assert calls[0][:3] == ["a", "b", "c"]
    # A fill that raises is blamed on the first row it was given, which fails, and the fill
    # runs again without it: here a, then b (whose grammar it really was); c goes on.
    assert set(failed) == {"a", "b"} and "injected fill failure" in failed["a"]
    assert staged.failed == failed
    assert [sr.is_sampling for sr in staged.staged] == [False, False, True]
    assert calls[-1][:3] == [None, None, "c"]
    # the failed rows sample as padding; the forward's arrays are untouched
    assert staged.sampling.temperature[:3].tolist() == [0.0, 0.0, 0.5]
    assert staged.sampling.steps[:3].tolist() == [0, 0, 1]
    np.testing.assert_array_equal(staged.inputs.input_ids, forward_ids)
