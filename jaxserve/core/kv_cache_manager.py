"""KVCacheManager: each request's block table, prefix-cache lookups, allocate_slots / free.

The scheduler talks to this module in request terms (tokens, block ids); the BlockPool below
it owns ref counts and the LRU free queue. Block hashes are chained sha256 digests of full
blocks, kept on request.block_hashes and extended as the request's tokens grow.
"""

from __future__ import annotations

import hashlib
from array import array

from jaxserve.core.block_pool import BlockPool, KVCacheBlock
from jaxserve.request import Request

# parent of a request's first block when it has no extra keys (salt, adapter)
ROOT_BLOCK_HASH = hashlib.sha256(b"jaxserve-block-hash-v1").digest()


def root_block_hash(request: Request) -> bytes:
    """The parent hash of the request's first block: folds in its extra keys.

    The extra keys enter the chain once, at its root; every later hash inherits them.
    Length-prefixed fields keep (salt="ab", adapter=None) apart from (salt="a", adapter="b").
    """
    if request.cache_salt is None and request.adapter_id is None:
        return ROOT_BLOCK_HASH
    parts = [ROOT_BLOCK_HASH]
    for key in (request.cache_salt, request.adapter_id):
        if key is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            encoded = key.encode("utf-8")
            parts.append(len(encoded).to_bytes(4, "little"))
            parts.append(encoded)
    return hashlib.sha256(b"".join(parts)).digest()


def hash_block_tokens(parent_hash: bytes, token_ids: list[int]) -> bytes:
    """sha256(parent hash, token ids as int32): the identity of one full block in the cache."""
    hasher = hashlib.sha256(parent_hash)
    hasher.update(array("i", token_ids).tobytes())
    return hasher.digest()


def update_block_hashes(request: Request, block_size: int) -> None:
    """Appends the hashes of the request's newly full blocks: O(new blocks) per call."""
    block_hashes = request.block_hashes
    num_full_blocks = request.num_tokens // block_size
    if len(block_hashes) >= num_full_blocks:
        return
    token_ids = request.all_token_ids
    parent = block_hashes[-1] if block_hashes else root_block_hash(request)
    for i in range(len(block_hashes), num_full_blocks):
        parent = hash_block_tokens(parent, token_ids[i * block_size : (i + 1) * block_size])
        block_hashes.append(parent)


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_caching: bool, max_model_len: int
    ) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.max_model_len = max_model_len
        # most blocks one request can hold: the longest sequence it may ever compute
        self.max_blocks_per_request = -(-max_model_len // block_size)
        self.block_pool = BlockPool(num_blocks, enable_caching)
        # req_id -> the request's blocks, in token order
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # req_id -> the same blocks' ids; one live list per request, extended in place, so
        # handing the block table to the runner costs O(1) instead of a copy per step
        self.req_to_block_ids: dict[str, list[int]] = {}
        # req_id -> how many leading blocks of the request are in the prefix cache already
        self.num_cached_blocks: dict[str, int] = {}
        # cumulative, in tokens, counted once per admission: tokens looked up / found
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    @property
    def num_usable_blocks(self) -> int:
        """All blocks but the null block."""
        return self.block_pool.num_usable_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a live list: valid until its next allocate_slots/free)."""
        return self.req_to_block_ids.get(request_id, [])

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """(ids of the cached blocks of the request's longest cached prefix, tokens they hold).

        NOTE: never the whole sequence: the last token must be computed to sample from it, so
        at most (num_tokens - 1) // block_size blocks can hit.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            # (prompt logprobs need every prompt position computed, so no hits)
            return [], 0
        update_block_hashes(request, self.block_size)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hit_block_ids = []
        cache = self.block_pool.cached_block_hash_to_block
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = cache.get(block_hash)
            if block is None:
                break
            hit_block_ids.append(block.block_id)
        return hit_block_ids, len(hit_block_ids) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_block_ids: list[int] | None = None,
        num_new_computed_tokens: int = 0,
    ) -> list[int] | None:
        """Grows the request's block table to hold num_new_tokens more tokens; None if short.

        new_computed_block_ids / num_new_computed_tokens are the prefix hit from
        get_computed_blocks (only on the request's first allocation after admission). On
        failure nothing changes. On success the blocks that fill up with tokens computed this
        step enter the prefix cache right away, so a request scheduled later in the same step
        (an n>1 sibling) already hits them; the runner writes a step's KV before reading it.
        """
        req_id = request.request_id
        held_ids = self.req_to_block_ids.get(req_id)
        if held_ids is not None and not new_computed_block_ids:
            # the common decode step: its token fits the blocks already held
            num_tokens_after = request.num_computed_tokens + num_new_tokens
            if num_tokens_after <= len(held_ids) * self.block_size:
                if (
                    self.enable_caching
                    and min(num_tokens_after, request.num_tokens) // self.block_size
                    > self.num_cached_blocks[req_id]
                ):  # (checked here: most decode steps fill no block)
                    self._cache_full_blocks(request, self.req_to_blocks[req_id], num_tokens_after)
                return held_ids
        hit_blocks = [self.block_pool.blocks[i] for i in new_computed_block_ids or ()]
        blocks = self.req_to_blocks.get(req_id)
        num_held = len(blocks) if blocks is not None else 0
        num_tokens_after = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        num_required = -(-num_tokens_after // self.block_size)
        num_new_blocks = num_required - num_held - len(hit_blocks)
        # hit blocks that sit in the free queue stop being free once touched
        num_free_hits = sum(1 for block in hit_blocks if block.ref_cnt == 0)
        if num_new_blocks > self.block_pool.get_num_free_blocks() - num_free_hits:
            return None
        if num_required > self.max_blocks_per_request:
            raise RuntimeError(
                f"request {req_id} would hold {num_tokens_after} tokens, "
                f"more than max_model_len={self.max_model_len}"
            )

        if blocks is None:
            blocks = self.req_to_blocks[req_id] = []
            block_ids = self.req_to_block_ids[req_id] = []
            self.num_cached_blocks[req_id] = 0
            if self.enable_caching:
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += num_new_computed_tokens
        else:
            block_ids = self.req_to_block_ids[req_id]
        if hit_blocks:
            self.block_pool.touch(hit_blocks)
            blocks.extend(hit_blocks)
            self.num_cached_blocks[req_id] += len(hit_blocks)
        if num_new_blocks > 0:
            blocks.extend(self.block_pool.get_new_blocks(num_new_blocks))
        if len(block_ids) < len(blocks):
            block_ids.extend(block.block_id for block in blocks[len(block_ids) :])

        if self.enable_caching:
            self._cache_full_blocks(request, blocks, num_tokens_after)
        return block_ids

    def _cache_full_blocks(
        self, request: Request, blocks: list[KVCacheBlock], num_tokens_after: int
    ) -> None:
        req_id = request.request_id
        num_full = min(num_tokens_after, request.num_tokens) // self.block_size
        num_cached = self.num_cached_blocks[req_id]
        if num_full <= num_cached:
            return
        update_block_hashes(request, self.block_size)
        self.block_pool.cache_full_blocks(blocks, request.block_hashes, num_cached, num_full)
        self.num_cached_blocks[req_id] = num_full

    def free(self, request: Request) -> None:
        """Returns the request's blocks to the pool, tail first; their hashes stay cached.

        NOTE: blocks cached for tokens the request has not computed yet (it is preempted in
        the very step that scheduled them) lose their hash, so no one hits KV never written.
        """
        req_id = request.request_id
        blocks = self.req_to_blocks.pop(req_id, None)
        self.req_to_block_ids.pop(req_id, None)
        num_cached = self.num_cached_blocks.pop(req_id, 0)
        if blocks is None:
            return
        num_valid = request.num_computed_tokens // self.block_size
        for block in blocks[num_valid:num_cached]:
            if block.ref_cnt == 1:
                self.block_pool.uncache_block(block)
        self.block_pool.free_blocks(reversed(blocks))

    def uncache_block_ids(self, block_ids: list[int]) -> None:
        """Drops these blocks' hashes (their KV was never written after all), held or not."""
        for block_id in block_ids:
            self.block_pool.uncache_block(self.block_pool.blocks[block_id])

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()
