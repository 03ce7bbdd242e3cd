"""How a step's prefill tokens are cut into query tiles for the `xla` attention.

A tile's tokens belong to one request and share one walk over its blocks: its keys are
gathered once for all of them, and its scores are one [tile * group, head_dim] x [head_dim,
keys] dot per kv head. step_inputs cuts the tiles on the host with numpy; the attention cuts
them with jax.numpy where no host built them (the embedder, tests). One function serves both.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Query tokens per (narrow) prefill tile.
QUERY_TILE = 64
# Query tokens per wide tile: a request with this many query tokens in a step (a long
# prompt's chunk) walks its keys in tiles this wide first, and its remaining tokens in
# QUERY_TILE ones. XLA:CPU runs the wider tile's dots 2-4x faster (measured on a 2-core EPYC:
# 22 GFLOP/s for [192, 64] x [64, 128] inside the walk, 75 for [768, 64] x [64, 256]), and a
# 1024-token prompt's prefill went from 0.62x to 0.69x of the same with attention a no-op
# (bench PREFILL, three alternated runs each). Short prompts keep narrow tiles: a wide tile
# half empty computes twice the scores it needs.
WIDE_QUERY_TILE = 256


def query_tiles(
    cu_q_lens: Any, num_tokens: int, xp: Any = np
) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """The prefill tiles of a step: ((first token, real tokens) of each QUERY_TILE tile,
    i32[max(1, T // 2)]), and the same of each wide tile, i32[max(1, T // WIDE_QUERY_TILE)].

    A request with two or more query tokens is cut into as many WIDE_QUERY_TILE tiles as
    fit, then tiles of QUERY_TILE tokens (the last may be shorter); a request with one (a
    decode, or a prefill's last token) has none and goes through the per-token path. Tiles
    are packed first, padding tiles have length 0. `xp` is numpy on the host (step_inputs
    builds them) or jax.numpy inside a jit.
    """
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    tiled = q_lens >= 2
    wide = xp.where(tiled, q_lens // WIDE_QUERY_TILE, 0) * WIDE_QUERY_TILE
    rest = xp.where(tiled, q_lens - wide, 0)
    first = cu_q_lens[:-1]
    narrow_slots = max(1, num_tokens // 2)  # a narrow tile has >= 2 tokens, or follows a wide
    wide_slots = max(1, num_tokens // WIDE_QUERY_TILE)
    return (
        _cut(first + wide, rest, QUERY_TILE, narrow_slots, xp),
        _cut(first, wide, WIDE_QUERY_TILE, wide_slots, xp),
    )


def _cut(first: Any, lens: Any, size: int, slots: int, xp: Any) -> tuple[Any, Any]:
    """Each request's tokens [first, first + lens) cut into tiles of `size` (the last may be
    shorter), packed into `slots` entries: (first token, real tokens), padding (0, 0)."""
    per_req = (lens + size - 1) // size
    cum = xp.cumsum(per_req)
    j = xp.arange(slots, dtype=np.int32)
    req = xp.minimum(xp.searchsorted(cum, j, side="right"), lens.shape[0] - 1)
    start = first[req] + (j - (cum[req] - per_req[req])) * size
    tile_lens = xp.where(j < cum[-1], xp.minimum(size, first[req] + lens[req] - start), 0)
    return xp.where(tile_lens > 0, start, 0).astype(np.int32), tile_lens.astype(np.int32)
