"""StepInputs: the flat ragged token batch of one step, and the shape buckets it is padded to.

The scheduler's output (host lists) becomes one registered pytree of arrays. Its bucket sizes
(tokens T, requests R, blocks per request B) are static fields, so the set of compiled programs
can be read off `Buckets.all_shapes()`: nothing else changes a traced shape.

A step is staged in two phases, as it runs in two programs (runner/step_fn.py): this module's
`stage_forward` builds the forward's StepInputs; runner/sampler_inputs.py then stages the
sampler's, once the forward is on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from jaxserve.core.outputs import ScheduledRequest, SchedulerOutput
from jaxserve.model.attention import AttentionMetadata
from jaxserve.model.tiles import WIDE_QUERY_TILE, query_tiles
from jaxserve.request import Request
from jaxserve.runner.buckets import Buckets
from jaxserve.runner.input_batch import InputBatch
from jaxserve.runner.prompt_spans import PromptLogprobSpan, prompt_spans, prompt_targets
from jaxserve.runner.sampler import SamplingMetadata

logger = logging.getLogger(__name__)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "input_ids",
        "positions",
        "attn",
        "logits_indices",
        "prompt_targets",
        "prev_rows",
        "lora_slots",
    ],
    meta_fields=["num_tokens", "num_reqs", "num_blocks_per_req"],
)
@dataclasses.dataclass
class StepInputs:
    input_ids: jax.Array  # i32[T] token ids, padded with 0
    positions: jax.Array  # i32[T] position of each token in its request, padded with 0
    attn: AttentionMetadata  # slot mapping, block tables, kv lens, cu_q_lens
    logits_indices: jax.Array  # i32[R] index into T of each request's last token this step
    prompt_targets: jax.Array  # i32[T] the prompt token each position predicts, for requests
    # with prompt_logprobs (runner/prompt_logprobs.py); -1 elsewhere
    prev_rows: jax.Array  # i32[T] async scheduling: the row of the previous step's sampled
    # ids that is this token's id (it was in flight when this step was staged); -1: input_ids
    num_tokens: int  # T, the token bucket
    num_reqs: int  # R, the request bucket
    num_blocks_per_req: int  # B, the block-table width bucket
    # i32[T] each token's LoRA adapter slot (0: none, padding too); None when LoRA is off
    lora_slots: jax.Array | None = None


@dataclasses.dataclass
class StagedStep:
    """One step's inputs, and the requests that had to be left out of it."""

    # None when every scheduled request failed to stage (there is nothing to run)
    inputs: StepInputs | None
    # the staged requests in batch-row order (row i of the step is staged[i])
    staged: list[ScheduledRequest]
    # req_id -> why its part of the step could not be staged (it is not in `inputs`)
    failed: dict[str, str]
    # the staged requests' prompt-logprob positions (empty when none asks)
    prompt_spans: list[PromptLogprobSpan] = dataclasses.field(default_factory=list)
    # i32[R] each row's sample index (the output token it samples), -1 for a row that does
    # not sample (a prefill chunk short of its prompt's end, or padding)
    sample_steps: np.ndarray | None = None
    # the sampler's inputs, set by stage_sampling (None until then)
    sampling: SamplingMetadata | None = None


# The device LoRA slot a request's tokens use (0: none); None when LoRA is off.
LoRASlotOf = Callable[[Request], int]


def stage_forward(
    scheduler_output: SchedulerOutput,
    buckets: Buckets,
    block_size: int,
    *,
    lora_slot_of: LoRASlotOf | None = None,
    prev_rows: Mapping[str, int] | None = None,
    batch: InputBatch | None = None,
) -> StagedStep:
    """Host-side (numpy) staging of one step's forward: O(tokens + requests), plus the block
    ids a request gains (its other rows' values persist in `batch`, the runner's InputBatch;
    None: a fresh one, whose rows follow the scheduled order).

    prev_rows (async scheduling): req_id -> its row in the previous step, whose sampled id is
    still on the device; a request whose last scheduled token is that one reads it from there.

    NOTE on failures: each request's rows are staged under their own guard; one that raises
    is left out and named in `failed`, and the step is staged again without it (a rare path:
    admission already checked what it could). A request whose block table holds a block that
    a failed request was to write this step (an n > 1 sibling's prefix hit) is left out too,
    since it would read KV that is never computed.
    """
    scheduled = scheduler_output.scheduled
    if batch is None:
        batch = InputBatch(buckets.max_num_reqs, buckets.max_blocks_per_req)
    failed: dict[str, str] = {}
    while True:
        todo = [sr for sr in scheduled if sr.request.request_id not in failed]
        if not todo:
            batch.retain(todo)
            return StagedStep(inputs=None, staged=[], failed=failed)
        try:
            inputs, ordered, steps = _stage(
                todo, buckets, block_size, batch, lora_slot_of, prev_rows or {}
            )
            spans = prompt_spans(ordered)
            if spans:
                inputs.prompt_targets = prompt_targets(spans, inputs.num_tokens)
            return StagedStep(inputs, ordered, failed, spans, sample_steps=steps)
        except _RequestStagingError as e:
            sr = e.scheduled
            logger.error(
                "request %s could not be staged (left out of the step)",
                sr.request.request_id,
                exc_info=e.__cause__,
            )
            failed[sr.request.request_id] = staging_failure(e.__cause__)
            failed.update(_sharing_unwritten_blocks(scheduled, failed, block_size))


def staging_failure(cause: BaseException | None) -> str:
    """The error a request left out of a step ends with."""
    return f"the engine could not stage this request: {type(cause).__name__}: {cause}"


class _RequestStagingError(Exception):
    """Staging `scheduled` (one request) raised; the cause is chained."""

    def __init__(self, scheduled: ScheduledRequest) -> None:
        super().__init__(scheduled.request.request_id)
        self.scheduled = scheduled


def _written_blocks(sr: ScheduledRequest, block_size: int) -> list[int]:
    """The blocks this step writes KV into for `sr`."""
    first = sr.num_computed_tokens // block_size
    last = -(-(sr.num_computed_tokens + sr.num_scheduled_tokens) // block_size)
    return sr.block_ids[first:last]


def _sharing_unwritten_blocks(
    scheduled: Sequence[ScheduledRequest], failed: dict[str, str], block_size: int
) -> dict[str, str]:
    """Requests not yet failed that hold a block a failed request was to write this step."""
    unwritten: set[int] = set()
    for sr in scheduled:
        if sr.request.request_id in failed:
            unwritten.update(_written_blocks(sr, block_size))
    more: dict[str, str] = {}
    changed = True
    while changed:  # a sibling left out leaves its own blocks unwritten in turn
        changed = False
        for sr in scheduled:
            rid = sr.request.request_id
            if rid in failed or rid in more or unwritten.isdisjoint(sr.block_ids):
                continue
            more[rid] = "its cached prompt prefix came from a request that failed in this step"
            unwritten.update(_written_blocks(sr, block_size))
            changed = True
    return more


@functools.lru_cache(maxsize=32)
def _no_targets(num_tokens: int) -> np.ndarray:
    """All -1 i32[T], read-only and shared (DeviceInputs keeps it on the device): the
    prompt_targets of a step without prompt logprobs, and its prev_rows without tokens in flight."""
    a = np.full(num_tokens, -1, np.int32)
    a.setflags(write=False)
    return a


def _stage(
    scheduled: Sequence[ScheduledRequest],
    buckets: Buckets,
    block_size: int,
    batch: InputBatch,
    lora_slot_of: LoRASlotOf | None = None,
    prev_rows: Mapping[str, int] | None = None,
) -> tuple[StepInputs, list[ScheduledRequest], np.ndarray]:
    """The padded forward arrays of `scheduled`, the requests in their rows' order, and each
    row's sample index (-1: not sampling); raises _RequestStagingError naming the one that
    fails."""
    # The persistent rows first: a request keeps its row (block table, fixed sampling
    # values) from step to step, and only a new one or a grown table is written.
    batch.retain(scheduled)
    for sr in scheduled:
        try:
            batch.place(sr)
        except Exception as e:  # noqa: BLE001 - a failure here is this request's alone
            raise _RequestStagingError(sr) from e
    ordered = batch.in_row_order(scheduled)
    max_blocks = max(len(s.block_ids) for s in ordered)
    num_tokens = sum(s.num_scheduled_tokens for s in ordered)
    t, r, b = buckets.select(num_tokens, max_blocks)
    # One pass in Python over the requests collects plain lists (the only per-request work
    # that can fail, so a failure is that request's alone); numpy then builds every array
    # in a few whole-batch operations instead of ~10 small ones per request.
    ids: list[int] = []
    starts, lens, slots, sampling = [], [], [], []
    # tokens in flight (async scheduling): their index in the step, and their previous row
    in_flight_at: list[int] = []
    in_flight_rows: list[int] = []
    for sr in ordered:
        try:
            request = sr.request
            start, n = sr.num_computed_tokens, sr.num_scheduled_tokens
            chunk = request.all_token_ids[start : start + n]
            if len(chunk) != n:  # its last token is in flight
                _check_in_flight(sr, prev_rows)
                in_flight_at.append(len(ids) + len(chunk))
                in_flight_rows.append(prev_rows[request.request_id])  # type: ignore[index]
                chunk.append(0)  # read on the device from the previous step's output
            if -(-(start + n) // block_size) > len(sr.block_ids):
                raise ValueError(f"no {n} tokens from {start} in {len(sr.block_ids)} blocks")
            ids += chunk
            starts.append(start)
            lens.append(n)
            sampling.append(sr.is_sampling)
            if lora_slot_of is not None:
                slots.append(lora_slot_of(request))
        except Exception as e:  # noqa: BLE001 - a failure here is this request's alone
            raise _RequestStagingError(sr) from e
    nreq = len(ordered)
    q_lens = np.asarray(lens, np.int32)
    starts_arr = np.asarray(starts, np.int32)
    cu_q_lens = np.full(r + 1, num_tokens, np.int32)
    cu_q_lens[0] = 0
    cu_q_lens[1 : nreq + 1] = np.cumsum(q_lens)
    token_req_idx = np.zeros(t, np.int32)
    token_req_idx[:num_tokens] = np.repeat(np.arange(nreq, dtype=np.int32), q_lens)
    positions = np.zeros(t, np.int32)
    # each token's position: its request's start + its offset inside the request's tokens
    positions[:num_tokens] = np.arange(num_tokens, dtype=np.int32) - np.repeat(
        cu_q_lens[:nreq] - starts_arr, q_lens
    )
    input_ids = np.zeros(t, np.int32)
    input_ids[:num_tokens] = ids
    block_tables = batch.block_tables(r, b)
    slot_mapping = np.zeros(t, np.int32)  # padding writes land in the null block
    real = token_req_idx[:num_tokens], positions[:num_tokens]
    slot_mapping[:num_tokens] = (
        block_tables[real[0], real[1] // block_size] * block_size + real[1] % block_size
    )
    kv_lens = np.zeros(r, np.int32)
    kv_lens[:nreq] = starts_arr + q_lens
    logits_indices = np.zeros(r, np.int32)
    logits_indices[:nreq] = cu_q_lens[1 : nreq + 1] - 1
    lora_slots = None
    if lora_slot_of is not None:
        lora_slots = np.zeros(t, np.int32)
        lora_slots[:num_tokens] = np.repeat(np.asarray(slots, np.int32), q_lens)
    (tile_starts, tile_lens), (wide_starts, wide_lens) = query_tiles(cu_q_lens, t)
    # each sampling row's sample index (the output token it samples: one past any in flight)
    steps = np.full(r, -1, np.int32)
    is_sampling = np.asarray(sampling, bool)
    steps[:nreq][is_sampling] = (kv_lens[:nreq] - batch.num_prompt[:nreq])[is_sampling]
    prev = _no_targets(t)
    if in_flight_at:
        prev = np.full(t, -1, np.int32)
        prev[in_flight_at] = in_flight_rows
    inputs = StepInputs(
        input_ids=input_ids,
        positions=positions,
        attn=AttentionMetadata(
            slot_mapping=slot_mapping,
            token_req_idx=token_req_idx,
            block_tables=block_tables,
            kv_lens=kv_lens,
            cu_q_lens=cu_q_lens,
            tile_starts=tile_starts,
            tile_lens=tile_lens,
            wide_tile_starts=wide_starts,
            wide_tile_lens=wide_lens,
        ),
        logits_indices=logits_indices,
        prompt_targets=_no_targets(t),
        prev_rows=prev,
        num_tokens=t,
        num_reqs=r,
        num_blocks_per_req=b,
        lora_slots=lora_slots,
    )
    return inputs, ordered, steps


def _check_in_flight(sr: ScheduledRequest, prev_rows: Mapping[str, int] | None) -> None:
    """A chunk may end one token short of the host's history: the token the previous step
    samples (async scheduling), and only when that step's output holds it."""
    request = sr.request
    end = sr.num_computed_tokens + sr.num_scheduled_tokens
    # (schedule() counted this step's own sample as a placeholder already)
    before = request.num_output_placeholders - sr.is_sampling
    if (
        end != request.num_tokens + 1
        or before != 1
        or prev_rows is None
        or request.request_id not in prev_rows
    ):
        raise ValueError(
            f"tokens up to {end} scheduled, the request has {request.num_tokens} "
            f"and {before} in flight"
        )


def dummy_step_inputs(shape: tuple[int, int, int], *, lora: bool = False) -> StepInputs:
    """An all-padding forward of the given bucket (for warmup): every write hits the null
    block."""
    t, r, b = shape
    zeros = functools.partial(np.zeros, dtype=np.int32)
    return StepInputs(
        input_ids=zeros(t),
        positions=zeros(t),
        attn=AttentionMetadata(
            slot_mapping=zeros(t),
            token_req_idx=zeros(t),
            block_tables=zeros((r, b)),
            kv_lens=zeros(r),
            cu_q_lens=zeros(r + 1),
            tile_starts=zeros(max(1, t // 2)),
            tile_lens=zeros(max(1, t // 2)),
            wide_tile_starts=zeros(max(1, t // WIDE_QUERY_TILE)),
            wide_tile_lens=zeros(max(1, t // WIDE_QUERY_TILE)),
        ),
        logits_indices=zeros(r),
        prompt_targets=_no_targets(t),
        prev_rows=_no_targets(t),
        num_tokens=t,
        num_reqs=r,
        num_blocks_per_req=b,
        lora_slots=zeros(t) if lora else None,
    )
