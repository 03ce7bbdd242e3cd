"""The declared shape buckets of a step: token count T, request count R, block-table width B.

Every step is padded up to one of them, so the set of compiled programs is
`Buckets.all_shapes()` (warmup compiles exactly those) and nothing else changes a traced shape.
"""

from __future__ import annotations

import dataclasses


def powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 2 lo, 4 lo, ... while below hi, then hi."""
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
            token_sizes=powers_of_two(min(16, max_num_batched_tokens), max_num_batched_tokens),
            block_sizes=powers_of_two(min(4, max_blocks), max_blocks),
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

    @property
    def max_num_reqs(self) -> int:
        """The largest R bucket (a power of two: it may pass max_num_seqs)."""
        return self.num_reqs_for(self.token_sizes[-1])

    @property
    def max_blocks_per_req(self) -> int:
        """The widest B bucket."""
        return self.block_sizes[-1]
