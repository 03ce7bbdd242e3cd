"""KVCacheManager: block tables, prefix hits, the last-token cap, salts, eviction."""

import pytest

from jaxserve.core.kv_cache_manager import (
    KVCacheManager,
    hash_block_tokens,
    root_block_hash,
    update_block_hashes,
)
from jaxserve.lora.request import LoRARequest
from jaxserve.request import Request
from jaxserve.sampling_params import SamplingParams

BLOCK_SIZE = 4


def _lora_id(name: str) -> int:
    """A distinct positive id per adapter name (the hash keys on the id)."""
    return 1 + int.from_bytes(name.encode(), "little")


def make_request(req_id, prompt, cache_salt=None, adapter_id=None, max_tokens=8):
    return Request(
        req_id,
        list(prompt),
        SamplingParams(max_tokens=max_tokens),
        eos_token_id=None,
        sampling_seed=0,
        cache_salt=cache_salt,
        lora_request=None
        if adapter_id is None
        else LoRARequest(adapter_id, _lora_id(adapter_id), "/a"),
        max_tokens=max_tokens,
    )


def make_manager(num_blocks=11, enable_caching=True, max_model_len=64):
    return KVCacheManager(num_blocks, BLOCK_SIZE, enable_caching, max_model_len)


def admit(manager, request):
    """What the scheduler does for a waiting request: look up hits, allocate the rest."""
    hit_ids, num_hit = manager.get_computed_blocks(request)
    block_ids = manager.allocate_slots(request, request.num_tokens - num_hit, hit_ids, num_hit)
    assert block_ids is not None
    request.num_computed_tokens = request.num_tokens
    return hit_ids, num_hit, list(block_ids)


def free_ids(manager):
    return [b.block_id for b in manager.block_pool.free_block_queue]


def test_allocate_exact_block_ids_and_free_order():
    manager = make_manager()
    request = make_request("a", range(10))  # 3 blocks: 4 + 4 + 2
    assert admit(manager, request) == ([], 0, [1, 2, 3])
    assert manager.get_block_ids("a") == [1, 2, 3]
    assert manager.num_free_blocks == 7
    manager.free(request)
    assert manager.get_block_ids("a") == []
    assert free_ids(manager) == [4, 5, 6, 7, 8, 9, 10, 3, 2, 1]


def test_allocate_grows_only_when_a_block_fills():
    manager = make_manager()
    request = make_request("a", range(4))
    admit(manager, request)
    assert manager.get_block_ids("a") == [1]
    request.append_output_token_ids(99)  # 5th token needs block 2
    assert manager.allocate_slots(request, 1) == [1, 2]
    request.num_computed_tokens += 1
    request.append_output_token_ids(98)
    assert manager.allocate_slots(request, 1) == [1, 2]


def test_prefix_hit_across_requests_with_the_same_prompt():
    manager = make_manager()
    prompt = list(range(10))
    admit(manager, make_request("a", prompt))
    # two full blocks of "a" are cached; the partial third is not
    hit_ids, num_hit, block_ids = admit(manager, make_request("b", prompt))
    assert (hit_ids, num_hit) == ([1, 2], 8)
    assert block_ids == [1, 2, 4]
    assert manager.block_pool.blocks[1].ref_cnt == 2
    assert manager.prefix_cache_queries == 20 and manager.prefix_cache_hits == 8


def test_last_token_is_always_recomputed():
    manager = make_manager()
    prompt = list(range(8))  # exactly two full blocks
    admit(manager, make_request("a", prompt))
    hit_ids, num_hit = manager.get_computed_blocks(make_request("b", prompt))
    assert (hit_ids, num_hit) == ([1], 4)


def test_different_cache_salt_or_adapter_never_hits():
    manager = make_manager()
    prompt = list(range(12))
    admit(manager, make_request("a", prompt, cache_salt="alice"))
    assert manager.get_computed_blocks(make_request("b", prompt, cache_salt="bob")) == ([], 0)
    assert manager.get_computed_blocks(make_request("c", prompt)) == ([], 0)
    assert manager.get_computed_blocks(make_request("d", prompt, adapter_id="alice")) == ([], 0)
    assert manager.get_computed_blocks(make_request("e", prompt, cache_salt="alice")) == (
        [1, 2],
        8,
    )


def test_hit_on_freed_blocks_takes_them_out_of_the_free_queue():
    manager = make_manager()
    prompt = list(range(10))
    a = make_request("a", prompt)
    admit(manager, a)
    manager.free(a)
    assert free_ids(manager) == [4, 5, 6, 7, 8, 9, 10, 3, 2, 1]
    hit_ids, num_hit, block_ids = admit(manager, make_request("b", prompt))
    assert (hit_ids, num_hit) == ([1, 2], 8)
    # the hits leave the queue; the new block is the LRU head
    assert block_ids == [1, 2, 4]
    assert free_ids(manager) == [5, 6, 7, 8, 9, 10, 3]


def test_evicted_blocks_no_longer_hit():
    manager = make_manager(num_blocks=5)  # 4 usable blocks
    prompt = list(range(9))
    a = make_request("a", prompt)
    admit(manager, a)  # blocks 1, 2 (cached), 3
    manager.free(a)
    assert free_ids(manager) == [4, 3, 2, 1]
    admit(manager, make_request("x", [7] * 12))  # takes 4, 3, 2: evicts block 2's hash
    assert manager.get_computed_blocks(make_request("b", prompt)) == ([1], 4)


def test_allocate_returns_none_and_changes_nothing_when_short():
    manager = make_manager(num_blocks=4)  # 3 usable
    a = make_request("a", range(8))
    admit(manager, a)
    b = make_request("b", range(100, 108))
    assert manager.allocate_slots(b, 8) is None
    assert manager.get_block_ids("b") == []
    assert manager.num_free_blocks == 1
    assert manager.prefix_cache_queries == 8  # a failed admission is not counted


def test_free_hit_blocks_count_against_free_space():
    manager = make_manager(num_blocks=4)  # 3 usable
    prompt = list(range(9))
    a = make_request("a", prompt)
    admit(manager, a)
    manager.free(a)
    b = make_request("b", prompt)
    hit_ids, num_hit = manager.get_computed_blocks(b)
    assert (hit_ids, num_hit) == ([1, 2], 8)
    # 3 free blocks, but 2 are the hits themselves: only one is left for new tokens
    assert manager.allocate_slots(b, 5, hit_ids, num_hit) is None
    assert manager.allocate_slots(b, 1, hit_ids, num_hit) == [1, 2, 3]


def test_decoded_tokens_that_fill_a_block_get_cached():
    manager = make_manager()
    a = make_request("a", range(6))
    admit(manager, a)
    for token in (50, 51):
        a.append_output_token_ids(token)
        manager.allocate_slots(a, 1)
        a.num_computed_tokens += 1
    # 8 computed tokens: blocks 1 and 2 are now cached
    b = make_request("b", list(range(6)) + [50, 51, 52])
    assert manager.get_computed_blocks(b) == ([1, 2], 8)


def test_block_hashes_grow_incrementally_and_match_a_full_rehash():
    request = make_request("a", range(6))
    update_block_hashes(request, BLOCK_SIZE)
    first = list(request.block_hashes)
    assert len(first) == 1
    request.append_output_token_ids([6, 7, 8])
    update_block_hashes(request, BLOCK_SIZE)
    assert request.block_hashes[:1] == first and len(request.block_hashes) == 2
    parent = root_block_hash(request)
    expected = []
    for i in range(2):
        parent = hash_block_tokens(parent, list(range(i * 4, i * 4 + 4)))
        expected.append(parent)
    assert request.block_hashes == expected


def test_extra_keys_are_unambiguous():
    a = make_request("a", [1], cache_salt="ab", adapter_id=None)
    b = make_request("b", [1], cache_salt="a", adapter_id="b")
    c = make_request("c", [1], cache_salt=None, adapter_id="ab")
    d = make_request("d", [1], cache_salt="", adapter_id=None)
    plain = make_request("e", [1])
    roots = {root_block_hash(r) for r in (a, b, c, d, plain)}
    assert len(roots) == 5


def test_caching_disabled_never_hashes_or_hits():
    manager = make_manager(enable_caching=False)
    prompt = list(range(12))
    a = make_request("a", prompt)
    admit(manager, a)
    assert a.block_hashes == []
    b = make_request("b", prompt)
    assert manager.get_computed_blocks(b) == ([], 0)
    assert admit(manager, b)[2] == [4, 5, 6]
    assert manager.block_pool.cached_block_hash_to_block == {}
    assert manager.prefix_cache_queries == 0


def test_free_before_compute_uncaches_the_blocks_it_registered():
    manager = make_manager()
    a = make_request("a", range(12))
    # scheduled this step (blocks registered) but preempted before the step ran
    assert manager.allocate_slots(a, 12) == [1, 2, 3]
    assert len(manager.block_pool.cached_block_hash_to_block) == 3
    manager.free(a)  # a.num_computed_tokens is still 0
    assert manager.block_pool.cached_block_hash_to_block == {}


def test_allocate_past_max_model_len_raises():
    manager = make_manager(max_model_len=8)
    with pytest.raises(RuntimeError, match="max_model_len"):
        manager.allocate_slots(make_request("a", range(9)), 9)


def test_reset_prefix_cache():
    manager = make_manager()
    a = make_request("a", range(8))
    admit(manager, a)
    assert manager.reset_prefix_cache() is False
    manager.free(a)
    assert manager.reset_prefix_cache() is True
    assert manager.get_computed_blocks(make_request("b", range(8))) == ([], 0)
