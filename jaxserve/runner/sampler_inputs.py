"""The sampler's inputs of a staged step: its second staging phase (runner/step_inputs.py
stages the forward).

`stage_sampling` runs once the step's forward is on the device (and, with async scheduling,
the previous step is read back and applied), so what follows a request's latest tokens is
current: its grammar's token bitmask, its bad_words, its penalty ids. The rows' fixed values
come from the runner's InputBatch, where the forward's staging placed them.
`build_step_inputs` runs both phases in turn (tests, tools).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from jaxserve.core.outputs import SchedulerOutput
from jaxserve.request import Request
from jaxserve.runner.buckets import Buckets
from jaxserve.runner.input_batch import InputBatch
from jaxserve.runner.sampler import SamplingMetadata
from jaxserve.runner.sampling_metadata import (
    RowStagingError,
    SamplingRow,
    build_sampling_metadata,
    penalty_width,
)
from jaxserve.runner.step_inputs import LoRASlotOf, StagedStep, stage_forward, staging_failure

logger = logging.getLogger(__name__)

# TokenMasks.fill: the sampling rows' requests (None: not sampling) and R -> (bitmask, has_mask),
# or None when no row is constrained.
FillMask = Callable[[Sequence[Request | None], int], "tuple[np.ndarray, np.ndarray] | None"]


def build_step_inputs(
    scheduler_output: SchedulerOutput,
    buckets: Buckets,
    block_size: int,
    penalty_len: int,
    *,
    bitmask_width: int | None = None,
    fill_mask: FillMask | None = None,
    lora_slot_of: LoRASlotOf | None = None,
    prev_rows: Mapping[str, int] | None = None,
    batch: InputBatch | None = None,
) -> StagedStep:
    """Both phases of staging in turn (stage_forward, then stage_sampling): the StagedStep
    with its `sampling` set; `failed` names the requests either phase failed."""
    if batch is None:
        batch = InputBatch(buckets.max_num_reqs, buckets.max_blocks_per_req)
    staged = stage_forward(
        scheduler_output,
        buckets,
        block_size,
        lora_slot_of=lora_slot_of,
        prev_rows=prev_rows,
        batch=batch,
    )
    if staged.inputs is not None:
        stage_sampling(
            staged, batch, block_size, penalty_len, bitmask_width=bitmask_width, fill_mask=fill_mask
        )
    return staged


def stage_sampling(
    staged: StagedStep,
    batch: InputBatch,
    block_size: int,
    penalty_len: int,
    *,
    bitmask_width: int | None = None,
    fill_mask: FillMask | None = None,
) -> dict[str, str]:
    """Sets `staged.sampling`, the sampler's inputs of a staged forward, from the requests'
    latest tokens (their grammar state, penalty history); `batch` must still hold the rows
    stage_forward gave them. fill_mask gives the token bitmask rows (TokenMasks.fill), None
    when no request is constrained. Returns req_id -> why, for the requests that failed here.

    NOTE on failures: the forward already runs with every row, so a row whose sampling cannot
    be staged (a grammar whose fill raises, a history its arrays cannot hold) stays in it and
    samples as padding; its request is named in the result and in `staged.failed`, marked
    not sampling in `staged.staged` (nothing is read back for it), and the caller fails it.
    """
    inputs = staged.inputs
    assert inputs is not None and staged.sample_steps is not None, "stage_forward first"
    r, width = inputs.num_reqs, penalty_width(inputs.num_blocks_per_req, block_size, penalty_len)
    steps = staged.sample_steps.copy()
    failed: dict[str, str] = {}
    while True:
        ordered = staged.staged
        row = -1
        try:
            token_mask = None
            if fill_mask is not None:
                rows = [sr.request if steps[i] >= 0 else None for i, sr in enumerate(ordered)]
                # a fill that raises is blamed on its first constrained row
                row = next((i for i, q in enumerate(rows) if q is not None), -1)
                token_mask = fill_mask(rows, r) if row >= 0 else None
                row = -1
            staged.sampling = batch.sampling_metadata(
                ordered, steps, r, width, bitmask_width=bitmask_width, token_mask=token_mask
            )
            break
        except RowStagingError as e:
            row, cause = e.row, e.cause
        except Exception as e:  # noqa: BLE001 - the fill's failure, blamed on `row`
            if row < 0:
                raise
            cause = e
        sr = ordered[row]
        logger.error(
            "request %s: its sampling could not be staged (it samples nothing this step)",
            sr.request.request_id,
            exc_info=cause,
        )
        failed[sr.request.request_id] = staging_failure(cause)
        steps[row] = -1
        ordered[row] = dataclasses.replace(sr, is_sampling=False)
    if failed:
        staged.failed.update(failed)
        staged.prompt_spans = [s for s in staged.prompt_spans if s.request_id not in failed]
    return failed


def dummy_sampling(
    num_rows: int, penalty_len: int, bitmask_width: int | None = None
) -> SamplingMetadata:
    """The sampler's inputs of an all-padding step of R = num_rows (greedy, nothing on)."""
    rows: list[SamplingRow | None] = [None] * num_rows
    return build_sampling_metadata(rows, num_rows, penalty_len, bitmask_width=bitmask_width)
