"""StepInputs: the flat ragged token batch of one step, and the shape buckets it is padded to.

The scheduler's output (host lists) becomes one registered pytree of arrays. Its bucket sizes
(tokens T, requests R, blocks per request B) are static fields, so the set of compiled programs
can be read off `Buckets.all_shapes()`: nothing else changes a traced shape.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import numpy as np

from jaxserve.core.outputs import SchedulerOutput
from jaxserve.model.attention import AttentionMetadata
from jaxserve.runner.sampler import SamplingMetadata
from jaxserve.runner.sampling_metadata import SamplingRow, build_sampling_metadata


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["input_ids", "positions", "attn", "logits_indices", "sampling"],
    meta_fields=["num_tokens", "num_reqs", "num_blocks_per_req"],
)
@dataclasses.dataclass
class StepInputs:
    input_ids: jax.Array  # i32[T] token ids, padded with 0
    positions: jax.Array  # i32[T] position of each token in its request, padded with 0
    attn: AttentionMetadata  # slot mapping, block tables, kv lens, cu_q_lens
    logits_indices: jax.Array  # i32[R] index into T of each request's last token this step
    sampling: SamplingMetadata  # per-row sampling parameters, [R, ...]
    num_tokens: int  # T, the token bucket
    num_reqs: int  # R, the request bucket
    num_blocks_per_req: int  # B, the block-table width bucket


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    sizes, s = [], lo
    while s < hi:
        sizes.append(s)
        s *= 2
    sizes.append(hi)
    return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The declared shape buckets: every step is padded up to one of these."""

    # token counts T, ascending; the last is max_num_batched_tokens
    token_sizes: tuple[int, ...]
    # block-table widths B, ascending; the last covers max_model_len
    block_sizes: tuple[int, ...]
    # most requests in a step (R is min(T, this), rounded up to a power of two)
    max_num_seqs: int

    @classmethod
    def make(
        cls, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int, block_size: int
    ) -> Buckets:
        max_blocks = -(-max_model_len // block_size)
        return cls(
            token_sizes=_powers_of_two(min(16, max_num_batched_tokens), max_num_batched_tokens),
            block_sizes=_powers_of_two(min(4, max_blocks), max_blocks),
            max_num_seqs=max_num_seqs,
        )

    def num_reqs_for(self, num_tokens: int) -> int:
        r = 1
        while r < min(num_tokens, self.max_num_seqs):
            r *= 2
        return r

    def select(self, num_tokens: int, num_blocks: int) -> tuple[int, int, int]:
        t = next(s for s in self.token_sizes if s >= num_tokens)
        b = next(s for s in self.block_sizes if s >= num_blocks)
        return t, self.num_reqs_for(t), b

    def all_shapes(self) -> list[tuple[int, int, int]]:
        return [(t, self.num_reqs_for(t), b) for t in self.token_sizes for b in self.block_sizes]


def build_step_inputs(
    scheduler_output: SchedulerOutput, buckets: Buckets, block_size: int, penalty_len: int
) -> StepInputs:
    """Host-side (numpy) staging of one step; O(tokens + block-table entries)."""
    scheduled = scheduler_output.scheduled
    max_blocks = max(len(s.block_ids) for s in scheduled)
    t, r, b = buckets.select(scheduler_output.total_num_scheduled_tokens, max_blocks)
    input_ids = np.zeros(t, np.int32)
    positions = np.zeros(t, np.int32)
    slot_mapping = np.zeros(t, np.int32)  # padding writes land in the null block
    token_req_idx = np.zeros(t, np.int32)
    block_tables = np.zeros((r, b), np.int32)
    kv_lens = np.zeros(r, np.int32)
    cu_q_lens = np.zeros(r + 1, np.int32)
    logits_indices = np.zeros(r, np.int32)
    rows: list[SamplingRow | None] = [None] * r
    offset = 0
    for i, sr in enumerate(scheduled):
        start, n = sr.num_computed_tokens, sr.num_scheduled_tokens
        end = offset + n
        input_ids[offset:end] = sr.request.all_token_ids[start : start + n]
        pos = np.arange(start, start + n, dtype=np.int32)
        positions[offset:end] = pos
        blocks = np.asarray(sr.block_ids, dtype=np.int32)
        slot_mapping[offset:end] = blocks[pos // block_size] * block_size + pos % block_size
        token_req_idx[offset:end] = i
        block_tables[i, : len(blocks)] = blocks
        kv_lens[i] = start + n
        cu_q_lens[i + 1] = end
        logits_indices[i] = end - 1
        if sr.is_sampling:
            rows[i] = SamplingRow.from_request(sr.request)
        offset = end
    cu_q_lens[len(scheduled) + 1 :] = offset
    return StepInputs(
        input_ids=input_ids,
        positions=positions,
        attn=AttentionMetadata(
            slot_mapping=slot_mapping,
            token_req_idx=token_req_idx,
            block_tables=block_tables,
            kv_lens=kv_lens,
            cu_q_lens=cu_q_lens,
        ),
        logits_indices=logits_indices,
        sampling=build_sampling_metadata(rows, r, penalty_len),
        num_tokens=t,
        num_reqs=r,
        num_blocks_per_req=b,
    )


def dummy_step_inputs(shape: tuple[int, int, int], penalty_len: int) -> StepInputs:
    """An all-padding step of the given bucket (for warmup): every write hits the null block."""
    t, r, b = shape
    zeros = functools.partial(np.zeros, dtype=np.int32)
    rows: Sequence[SamplingRow | None] = [None] * r
    return StepInputs(
        input_ids=zeros(t),
        positions=zeros(t),
        attn=AttentionMetadata(
            slot_mapping=zeros(t),
            token_req_idx=zeros(t),
            block_tables=zeros((r, b)),
            kv_lens=zeros(r),
            cu_q_lens=zeros(r + 1),
        ),
        logits_indices=zeros(r),
        sampling=build_sampling_metadata(list(rows), r, penalty_len),
        num_tokens=t,
        num_reqs=r,
        num_blocks_per_req=b,
    )
