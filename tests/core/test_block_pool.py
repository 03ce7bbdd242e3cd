"""BlockPool: exact block ids, LRU eviction order, ref counts and the hash map."""

import pytest

from jaxserve.core.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock


def free_ids(pool: BlockPool) -> list[int]:
    return [block.block_id for block in pool.free_block_queue]


def test_null_block_is_never_handed_out():
    pool = BlockPool(num_blocks=5, enable_caching=True)
    assert free_ids(pool) == [1, 2, 3, 4]
    assert pool.get_num_free_blocks() == 4
    assert [b.block_id for b in pool.get_new_blocks(4)] == [1, 2, 3, 4]
    with pytest.raises(RuntimeError):
        pool.get_new_blocks(1)
    assert pool.null_block.ref_cnt == 0
    with pytest.raises(RuntimeError):
        pool.touch([pool.null_block])


def test_num_blocks_below_two_is_refused():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(num_blocks=1, enable_caching=True)


def test_get_new_blocks_takes_from_lru_head_with_ref_cnt_one():
    pool = BlockPool(num_blocks=6, enable_caching=True)
    blocks = pool.get_new_blocks(2)
    assert [(b.block_id, b.ref_cnt) for b in blocks] == [(1, 1), (2, 1)]
    assert free_ids(pool) == [3, 4, 5]
    assert pool.usage == pytest.approx(2 / 5)


def test_free_in_reverse_order_puts_tail_blocks_first_for_eviction():
    pool = BlockPool(num_blocks=6, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    pool.free_blocks(reversed(blocks))
    assert free_ids(pool) == [4, 5, 3, 2, 1]
    assert all(b.ref_cnt == 0 for b in blocks)
    assert pool.usage == 0.0


def test_double_free_raises():
    pool = BlockPool(num_blocks=4, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free_blocks([block])


def test_shared_block_is_freed_only_when_last_reference_drops():
    pool = BlockPool(num_blocks=4, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free_blocks([block])
    assert block.ref_cnt == 1 and 1 not in free_ids(pool)
    pool.free_blocks([block])
    assert free_ids(pool) == [2, 3, 1]


def test_touch_on_cached_free_block_removes_it_from_the_middle_of_the_queue():
    pool = BlockPool(num_blocks=6, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    pool.cache_full_blocks(blocks, [b"h1", b"h2", b"h3"], 0, 2)
    pool.free_blocks(reversed(blocks))
    assert free_ids(pool) == [4, 5, 3, 2, 1]
    hit = pool.get_cached_block(b"h2")
    assert hit is not None and hit.block_id == 2
    pool.touch([hit])
    assert hit.ref_cnt == 1
    assert free_ids(pool) == [4, 5, 3, 1]
    assert pool.get_num_free_blocks() == 4


def test_freed_block_keeps_hash_until_evicted():
    pool = BlockPool(num_blocks=4, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    pool.cache_full_blocks(blocks, [b"a", b"b", b"c"], 0, 3)
    pool.free_blocks(reversed(blocks))
    # freed but still findable
    assert pool.get_cached_block(b"a").block_id == 1
    assert free_ids(pool) == [3, 2, 1]
    # the LRU head (block 3, hash c) is reused first: its hash entry goes, the others stay
    (reused,) = pool.get_new_blocks(1)
    assert reused.block_id == 3
    assert reused.block_hash is None
    assert pool.get_cached_block(b"c") is None
    assert pool.get_cached_block(b"a").block_id == 1
    assert pool.get_cached_block(b"b").block_id == 2


def test_duplicate_hash_keeps_the_first_block():
    pool = BlockPool(num_blocks=4, enable_caching=True)
    first, second = pool.get_new_blocks(2)
    pool.cache_full_blocks([first], [b"x"], 0, 1)
    pool.cache_full_blocks([second], [b"x"], 0, 1)
    assert pool.get_cached_block(b"x") is first
    assert second.block_hash is None
    # evicting the duplicate must not drop the first block's entry
    pool.free_blocks([second])
    pool.get_new_blocks(2)
    assert pool.get_cached_block(b"x") is first


def test_uncache_block_drops_its_entry():
    pool = BlockPool(num_blocks=3, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.cache_full_blocks([block], [b"y"], 0, 1)
    pool.uncache_block(block)
    assert block.block_hash is None and pool.get_cached_block(b"y") is None


def test_reset_prefix_cache_only_when_nothing_is_held():
    pool = BlockPool(num_blocks=4, enable_caching=True)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [b"p", b"q"], 0, 2)
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(b"p") is not None
    pool.free_blocks(reversed(blocks))
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(b"p") is None
    assert all(b.block_hash is None for b in pool.blocks)


def test_free_queue_remove_and_append_errors():
    blocks = [KVCacheBlock(i) for i in range(3)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[1])
    assert [b.block_id for b in queue] == [0, 2] and len(queue) == 2
    with pytest.raises(RuntimeError):
        queue.remove(blocks[1])
    with pytest.raises(RuntimeError):
        queue.append(blocks[0])
    queue.append(blocks[1])
    assert [queue.popleft().block_id for _ in range(3)] == [0, 2, 1]
    with pytest.raises(RuntimeError):
        queue.popleft()
