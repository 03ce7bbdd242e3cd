"""InputBatch: per-row host arrays that persist across steps (vLLM's InputBatch + BlockTable).

A request keeps its row of the step batch from the step it is first staged in until a step
that does not schedule it (it finished, was preempted, or got no token budget); then its row
is freed and the batch's last row moves into the hole, so rows 0..n-1 are always the step's n
requests. A row is written only when its request is added or grows a block: its block table,
and the sampling values that are fixed for a request's life (temperature .. min_p, penalties'
strengths, top_k, logprobs, seed, logit bias). A steady decode step writes nothing here; it
copies the first R rows out (copies: with async scheduling the device may still be reading the
previous step's arrays while the host stages the next one).

What still changes every step is staged per step, by step_inputs: the token ids, positions and
lengths, each row's sample index (its `step`), and the rare per-row extras that follow the
history (a min_tokens ban, the penalty ids of a penalized row).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxserve.core.outputs import ScheduledRequest
from jaxserve.request import Request
from jaxserve.runner.sampler import SamplingMetadata
from jaxserve.runner.sampling_metadata import (
    PADDING_FLOATS,
    PADDING_INTS,
    RowStagingError,
    SamplingRow,
    fixed_values,
    fold_seed,
    logit_bias_arrays,
    step_sampling_metadata,
)
from jaxserve.sampling_params import MAX_LOGIT_BIAS


class InputBatch:
    """The step batch's rows, kept between steps (one per ModelRunner)."""

    def __init__(self, max_rows: int, max_blocks: int) -> None:
        # rows and block-table width of the largest bucket (R and B)
        self.max_rows = max_rows
        self.max_blocks = max_blocks
        # i32[max_rows, max_blocks] each row's block ids (past its blocks: 0, the null block)
        self.block_table = np.zeros((max_rows, max_blocks), np.int32)
        # f32[6, max_rows] / i32[2, max_rows]: sampling_metadata's fixed values, one column
        # per row (a field's values over the rows are contiguous, as the step takes them)
        self.floats = np.repeat(PADDING_FLOATS[:, None], max_rows, axis=1)
        self.ints = np.repeat(PADDING_INTS[:, None], max_rows, axis=1)
        # u32[max_rows] each row's folded seed
        self.seeds = np.zeros(max_rows, np.uint32)
        # i32[max_rows] each row's prompt length (a sample's index = tokens after it - this)
        self.num_prompt = np.zeros(max_rows, np.int32)
        # logit bias (ids, values) per row, allocated when a row first has any
        self.bias_ids: np.ndarray | None = None
        self.bias_values: np.ndarray | None = None
        # rows 0..num_rows-1 are in use
        self.num_rows = 0
        # per row: its request, the block-id list its table was copied from (the KV manager
        # appends to one list per allocation, so `is` tells a grown table from a new one),
        # and how many of those ids the table holds
        self._requests: list[Request | None] = [None] * max_rows
        self._block_lists: list[list[int] | None] = [None] * max_rows
        self._num_blocks = [0] * max_rows
        # req_id -> row
        self.row_of: dict[str, int] = {}
        # rows whose requests have a logit bias / extras that follow the history (a
        # min_tokens ban, penalty ids)
        self.bias_rows: set[int] = set()
        self.history_rows: set[int] = set()

    def retain(self, scheduled: Sequence[ScheduledRequest]) -> None:
        """Frees the rows of the requests `scheduled` does not hold (the same Request)."""
        keep = {sr.request.request_id: sr.request for sr in scheduled}
        for rid in list(self.row_of):
            row = self.row_of[rid]  # (a removal moves the last row: look up afresh)
            if keep.get(rid) is not self._requests[row]:
                self._remove(row)

    def place(self, sr: ScheduledRequest) -> int:
        """`sr`'s row: added at the end when new; its block table grown to `sr.block_ids`.
        Raises (ValueError, OverflowError) when its values cannot be staged, before any write.
        """
        request, blocks = sr.request, sr.block_ids
        if len(blocks) > self.max_blocks:
            raise ValueError(f"{len(blocks)} blocks exceed the table's {self.max_blocks}")
        row = self.row_of.get(request.request_id)
        if row is None:
            row = self._add(request)
        held = self._num_blocks[row]
        if blocks is not self._block_lists[row] or len(blocks) < held:  # a new table
            self.block_table[row, len(blocks) : held] = 0
            held = 0
        if len(blocks) > held:
            self.block_table[row, held : len(blocks)] = blocks[held:]
        self._block_lists[row] = blocks
        self._num_blocks[row] = len(blocks)
        return row

    def in_row_order(self, scheduled: Sequence[ScheduledRequest]) -> list[ScheduledRequest]:
        """`scheduled` (all placed) sorted by row: row i of the step is the i-th."""
        ordered: list[ScheduledRequest | None] = [None] * len(scheduled)
        for sr in scheduled:
            ordered[self.row_of[sr.request.request_id]] = sr
        assert len(scheduled) == self.num_rows and None not in ordered, "place() each first"
        return ordered  # type: ignore[return-value]

    def block_tables(self, num_rows: int, width: int) -> np.ndarray:
        """The step's i32[R, B] block tables (a copy)."""
        return self.block_table[:num_rows, :width].copy()

    def sampling_metadata(
        self,
        ordered: Sequence[ScheduledRequest],
        steps: np.ndarray,
        num_rows: int,
        penalty_len: int,
        *,
        bitmask_width: int | None = None,
        token_mask: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> SamplingMetadata:
        """The step's SamplingMetadata: the rows' fixed values copied out, and the per-step
        extras of its sampling rows. `steps`: i32[R] each row's sample index, -1 for a row
        that does not sample this step (a prefill chunk short of its prompt's end: it stages
        as padding)."""
        sampling = steps >= 0
        floats = self.floats[:, :num_rows].copy()
        ints = self.ints[:, :num_rows].copy()
        seeds = self.seeds[:num_rows].copy()
        bias = None
        if self.bias_rows:
            assert self.bias_ids is not None and self.bias_values is not None
            bias = self.bias_ids[:num_rows].copy(), self.bias_values[:num_rows].copy()
        idle = np.flatnonzero(~sampling)
        if idle.size:
            floats[:, idle] = PADDING_FLOATS[:, None]
            ints[:, idle] = PADDING_INTS[:, None]
            seeds[idle] = 0
            if bias is not None:
                bias[0][idle], bias[1][idle] = -1, 0.0
        # (rows whose extras follow the history: a min_tokens ban, penalty ids)
        rows: dict[int, SamplingRow] = {}
        for i in sorted(self.history_rows):
            if sampling[i]:
                try:
                    rows[i] = SamplingRow.from_request(ordered[i].request, int(steps[i]))
                except Exception as e:  # noqa: BLE001 - a failure here is this row's alone
                    raise RowStagingError(i, e) from e
        return step_sampling_metadata(
            floats,
            ints,
            seeds,
            np.where(sampling, steps, 0).astype(np.int32),
            rows,
            num_rows,
            penalty_len,
            bias=bias,
            bitmask_width=bitmask_width,
            token_mask=token_mask,
        )

    def _add(self, request: Request) -> int:
        if self.num_rows == self.max_rows:
            raise ValueError(f"the step batch holds at most {self.max_rows} requests")
        row_view = SamplingRow.from_request(request)
        p = row_view.params
        f, k = fixed_values(p)  # raises for a value the arrays cannot hold
        seed = fold_seed(row_view.seed)
        bias = logit_bias_arrays(p)
        row = self.num_rows
        self.num_rows += 1
        self.floats[:, row], self.ints[:, row], self.seeds[row] = f, k, seed
        self.num_prompt[row] = request.num_prompt_tokens
        if bias is not None:
            if self.bias_ids is None:
                self.bias_ids = np.full((self.max_rows, MAX_LOGIT_BIAS), -1, np.int32)
                self.bias_values = np.zeros((self.max_rows, MAX_LOGIT_BIAS), np.float32)
            assert self.bias_values is not None
            self.bias_ids[row, : len(bias[0])] = bias[0]
            self.bias_values[row, : len(bias[1])] = bias[1]
            self.bias_rows.add(row)
        if p.min_tokens > 0 or p.has_penalties:
            self.history_rows.add(row)
        self._requests[row] = request
        self.row_of[request.request_id] = row
        return row

    def _remove(self, row: int) -> None:
        """Frees `row`; the last row moves into it."""
        request = self._requests[row]
        assert request is not None
        del self.row_of[request.request_id]
        last = self.num_rows - 1
        if row != last:
            self._move(last, row)
        self._clear(last)
        self.num_rows -= 1

    def _move(self, src: int, dst: int) -> None:
        n = max(self._num_blocks[src], self._num_blocks[dst])
        self.block_table[dst, :n] = self.block_table[src, :n]
        self.floats[:, dst], self.ints[:, dst] = self.floats[:, src], self.ints[:, src]
        self.seeds[dst], self.num_prompt[dst] = self.seeds[src], self.num_prompt[src]
        if self.bias_ids is not None and self.bias_values is not None:
            self.bias_ids[dst], self.bias_values[dst] = self.bias_ids[src], self.bias_values[src]
        for rows in (self.bias_rows, self.history_rows):
            rows.discard(dst)
            if src in rows:
                rows.add(dst)
        self._requests[dst] = self._requests[src]
        self._block_lists[dst] = self._block_lists[src]
        self._num_blocks[dst] = self._num_blocks[src]
        moved = self._requests[dst]
        assert moved is not None
        self.row_of[moved.request_id] = dst

    def _clear(self, row: int) -> None:
        """`row` back to padding: no blocks, greedy, no bias."""
        self.block_table[row, : self._num_blocks[row]] = 0
        self.floats[:, row], self.ints[:, row] = PADDING_FLOATS, PADDING_INTS
        self.seeds[row] = self.num_prompt[row] = 0
        if self.bias_ids is not None and self.bias_values is not None:
            self.bias_ids[row], self.bias_values[row] = -1, 0.0
        self.bias_rows.discard(row)
        self.history_rows.discard(row)
        self._requests[row] = self._block_lists[row] = None
        self._num_blocks[row] = 0
