"""Ragged paged attention: one call over a flat batch of decode tokens and prefill chunks."""

from pallas_kernels.ragged_paged_attention.api import ragged_paged_attention
from pallas_kernels.ragged_paged_attention.reference import (
    positions_from_lens,
    ref_ragged_paged_attention,
)

__all__ = ["positions_from_lens", "ragged_paged_attention", "ref_ragged_paged_attention"]
