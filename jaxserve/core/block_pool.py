"""BlockPool: every KV block's ref count, the LRU queue of free blocks, and the hash -> block map.

The KV cache manager asks this pool for blocks; the device only ever sees the block ids.
Block 0 is the null block (padding slots write there) and is never handed out. A freed block
keeps its hash and stays findable until it is evicted, i.e. reused for other tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class KVCacheBlock:
    """One KV block's host-side metadata (the KV itself lives on the device)."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        # index of the block in the device KV arrays
        self.block_id = block_id
        # number of live requests whose block table holds this block
        self.ref_cnt = 0
        # chained hash of the full block's tokens once it is in the prefix cache, else None
        self.block_hash: bytes | None = None
        # links of the free queue; both None while the block is not in it
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        has_hash = self.block_hash is not None
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, hashed={has_hash})"


class FreeBlockQueue:
    """Doubly linked list of free blocks, least recently used at the head.

    A deque cannot remove from the middle in O(1), and a prefix hit must take a cached block
    out of the queue wherever it sits; hence the intrusive links on KVCacheBlock.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        # sentinels, so that append/remove never special-case an empty queue
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        if block is self._tail:
            raise RuntimeError("no free block left")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        prev_block, next_block = block.prev_free, block.next_free
        if prev_block is None or next_block is None:
            raise RuntimeError(f"block {block.block_id} is not in the free queue")
        prev_block.next_free = next_block
        next_block.prev_free = prev_block
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        if block.prev_free is not None:
            raise RuntimeError(f"block {block.block_id} is already in the free queue")
        last = self._tail.prev_free
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free_blocks += 1

    def __iter__(self) -> Iterator[KVCacheBlock]:
        """Free blocks in eviction order (for tests and debugging; O(num_free_blocks))."""
        block = self._head.next_free
        while block is not self._tail:
            yield block
            block = block.next_free

    def __len__(self) -> int:
        return self.num_free_blocks


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be >= 2 (block 0 is the null block), got {num_blocks}"
            )
        # total blocks in the device KV arrays, the null block included
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # padding slots of every step write here; it is never in the free queue nor handed out
        self.null_block = self.blocks[0]
        self.free_block_queue = FreeBlockQueue(self.blocks[1:])
        # block hash -> the one cached block holding those tokens (held or free)
        self.cached_block_hash_to_block: dict[bytes, KVCacheBlock] = {}

    def get_num_free_blocks(self) -> int:
        """Blocks no request holds (cached or not): what get_new_blocks can hand out."""
        return self.free_block_queue.num_free_blocks

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def usage(self) -> float:
        """Fraction of usable blocks (all but the null block) held by at least one request."""
        return 1.0 - self.get_num_free_blocks() / self.num_usable_blocks

    def get_cached_block(self, block_hash: bytes) -> KVCacheBlock | None:
        return self.cached_block_hash_to_block.get(block_hash)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Takes num_blocks blocks from the LRU head (evicting their cached hashes), ref_cnt 1."""
        if num_blocks > self.get_num_free_blocks():
            raise RuntimeError(
                f"asked for {num_blocks} blocks, only {self.get_num_free_blocks()} free"
            )
        new_blocks = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            new_blocks.append(block)
        return new_blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Takes one more reference on each block (a prefix hit), out of the free queue if free."""
        for block in blocks:
            if block.ref_cnt == 0:
                if block is self.null_block:
                    raise RuntimeError("the null block cannot be held")
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drops one reference on each block; those reaching 0 join the free queue in this order.

        The first block given is the first evicted, so callers pass a request's blocks tail
        first: a prompt's last blocks are the least likely to be shared, so they go first.
        """
        for block in ordered_blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)

    def cache_full_blocks(
        self, blocks: list[KVCacheBlock], block_hashes: list[bytes], start: int, end: int
    ) -> None:
        """Enters blocks[start:end] (now full of computed tokens) under block_hashes[start:end].

        When the hash is already cached in another block (two requests computed the same
        tokens without sharing), the new block stays unhashed and simply dies when freed.
        """
        cache = self.cached_block_hash_to_block
        for i in range(start, end):
            block = blocks[i]
            if block.block_hash is not None:
                continue  # a prefix hit: already cached
            block_hash = block_hashes[i]
            if block_hash not in cache:
                block.block_hash = block_hash
                cache[block_hash] = block

    def uncache_block(self, block: KVCacheBlock) -> None:
        """Drops a block's hash (its KV will not be computed after all)."""
        if block.block_hash is not None:
            self._evict(block)

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached hash; refused (False) while any request holds a block."""
        if self.get_num_free_blocks() != self.num_usable_blocks:
            return False
        for block in self.cached_block_hash_to_block.values():
            block.block_hash = None
        self.cached_block_hash_to_block.clear()
        return True

    def _evict(self, block: KVCacheBlock) -> None:
        if self.cached_block_hash_to_block.get(block.block_hash) is block:
            del self.cached_block_hash_to_block[block.block_hash]
        block.block_hash = None
