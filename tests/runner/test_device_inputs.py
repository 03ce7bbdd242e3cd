"""What a step sends to the device: padding blocks once, the penalty block only when asked."""

from __future__ import annotations

import jax
import numpy as np

from jaxserve.core.outputs import ScheduledRequest, SchedulerOutput
from jaxserve.request import Request
from jaxserve.runner.buckets import Buckets
from jaxserve.runner.device_inputs import DeviceInputs
from jaxserve.runner.sampler_inputs import build_step_inputs
from jaxserve.sampling_params import SamplingParams

BLOCK = 4
MAX_MODEL_LEN = 64
BUCKETS = Buckets.make(32, 4, MAX_MODEL_LEN, BLOCK)


def _decode(rid: str, params: SamplingParams, prompt: list[int], output: list[int]):
    r = Request(rid, prompt, params, None, sampling_seed=0, max_tokens=8)
    r.append_output_token_ids(output)
    n = r.num_tokens
    blocks = list(range(1, -(-n // BLOCK) + 1))
    return ScheduledRequest(r, n - 1, 1, block_ids=blocks, is_sampling=True)


def _staged(*scheduled: ScheduledRequest):
    out = SchedulerOutput(scheduled=list(scheduled), total_num_scheduled_tokens=len(scheduled))
    staged = build_step_inputs(out, BUCKETS, BLOCK, MAX_MODEL_LEN, bitmask_width=8)
    assert staged.failed == {}
    return staged.inputs, staged.sampling


def test_padding_blocks_go_to_the_device_once():
    put = DeviceInputs(enabled=True)
    plain = SamplingParams(temperature=0.0)
    a, a_sampling = put(_staged(_decode("a", plain, [5, 6, 7], [8])))
    b, b_sampling = put(_staged(_decode("b", plain, [9, 10], [11, 12, 13])))
    # no penalties, bans, biases or constraints: the same device blocks, not sent again
    for name in ("penalty_token_ids", "token_bitmask", "logit_bias_ids", "banned_token_ids"):
        assert getattr(a_sampling, name) is getattr(b_sampling, name), name
    assert a.prompt_targets is b.prompt_targets
    assert isinstance(a_sampling.penalty_token_ids, jax.Array)
    # the step's small arrays stay numpy: jit copies them in its own fast path
    assert isinstance(a.input_ids, np.ndarray) and isinstance(a_sampling.temperature, np.ndarray)
    assert a.input_ids.tolist()[:1] == [8] and b.input_ids.tolist()[:1] == [13]
    num_constants = put.num_constants
    put(_staged(_decode("c", plain, [1, 2], [3])))
    assert put.num_constants == num_constants  # the same bucket: nothing new kept


def test_penalty_block_only_with_penalties_and_as_wide_as_the_blocks():
    put = DeviceInputs(enabled=True)
    pen = SamplingParams(temperature=0.0, repetition_penalty=1.3)
    plain = SamplingParams(temperature=0.0)
    host, sampling = _staged(
        _decode("p", pen, [5, 6, 7, 8, 9], [10, 11]), _decode("q", plain, [1], [2])
    )
    block = sampling.penalty_token_ids
    # [R, B * block_size] (B = 4 blocks of 4), not [R, max_model_len]
    assert block.shape == (host.num_reqs, host.num_blocks_per_req * BLOCK) == (4, 16)
    assert block.flags.writeable  # this step's own: jit copies it with the step
    assert block[0].tolist() == [5, 6, 7, 8, 9, 10, 11] + [-1] * 9
    assert (block[1:] == -1).all()
    assert sampling.penalty_prompt_lens.tolist() == [5, 0, 0, 0]
    dev = put(sampling)
    assert dev.penalty_token_ids is block
    # the next step without penalties in the same bucket uses the shared -1 block again
    _, plain_step = put(_staged(_decode("r", plain, [5, 6, 7, 8, 9], [10, 11])))
    assert plain_step.penalty_token_ids.shape == block.shape
    assert isinstance(plain_step.penalty_token_ids, jax.Array)
    assert (np.asarray(plain_step.penalty_token_ids) == -1).all()


def test_off_the_default_device_nothing_is_swapped():
    host = _staged(_decode("a", SamplingParams(temperature=0.0), [5, 6, 7], [8]))
    off = DeviceInputs(enabled=False)(host)
    assert off is host and isinstance(off[1].penalty_token_ids, np.ndarray)
