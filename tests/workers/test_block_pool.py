"""Block pool: reference counts, LRU eviction of cached blocks, chained hashes, hit counters."""

from __future__ import annotations

import pytest

from batonserve.workers.block_pool import BlockPool, hash_block, hash_blocks


def test_allocate_and_free_track_ref_counts_and_usage() -> None:
    pool = BlockPool(4, 2)
    a = pool.allocate(3)
    assert a is not None and len(set(a)) == 3
    assert pool.num_free_blocks == 1 and pool.usage == pytest.approx(0.75)
    assert pool.allocate(2) is None  # all-or-nothing
    pool.touch([a[0]])
    assert pool.ref_count(a[0]) == 2
    pool.free(a)
    assert pool.ref_count(a[0]) == 1 and pool.num_free_blocks == 3
    pool.free([a[0]])
    assert pool.num_free_blocks == 4 and pool.usage == 0.0
    with pytest.raises(AssertionError):
        pool.free([a[0]])


def test_chained_hash_depends_on_whole_prefix() -> None:
    h1 = hash_blocks([1, 2, 3, 4, 5, 6], 2)
    h2 = hash_blocks([9, 2, 3, 4, 5, 6], 2)
    assert len(h1) == 3
    # Same block contents, different parent: different hash all the way down.
    assert all(x != y for x, y in zip(h1, h2, strict=True))
    assert h1[1] == hash_block(h1[0], [3, 4])
    assert hash_blocks([1, 2, 3], 2) == h1[:1]  # only full blocks are hashed
    assert hash_blocks([1, 2, 3, 4, 5, 6], 2, start=1, parent=h1[0]) == h1[1:]


def test_cached_blocks_are_found_until_evicted_lru() -> None:
    pool = BlockPool(4, 2)
    hashes = hash_blocks([1, 2, 3, 4], 2)
    blocks = pool.allocate(2)
    assert blocks is not None
    for b, h in zip(blocks, hashes, strict=True):
        pool.cache_block(b, h)
    pool.free(blocks)  # free, but still cached
    assert pool.find_cached(hashes) == blocks
    # Fresh blocks are taken first; cached ones only when nothing else is free.
    other = pool.allocate(2)
    assert other is not None and not set(other) & set(blocks)
    assert pool.find_cached(hashes) == blocks
    # Freed in reverse: the tail block goes first, so the head (shared prefix) survives longest.
    third = pool.allocate(1)
    assert third == [blocks[1]]
    assert pool.find_cached(hashes) == [blocks[0]]
    assert pool.block_hash(blocks[1]) is None and pool.num_cached_blocks == 1


def test_touch_pulls_cached_block_out_of_free_queue_and_counts_hits() -> None:
    pool = BlockPool(2, 2)
    h = hash_blocks([7, 8], 2)
    (b,) = pool.allocate(1) or []
    pool.cache_block(b, h[0])
    pool.free([b])
    found = pool.find_cached(h)
    pool.touch(found)
    pool.record_query(3, 2)
    assert pool.ref_count(b) == 1 and pool.num_free_blocks == 1
    # The only free block is the other one: the touched block cannot be evicted.
    assert pool.allocate(1) == [1 - b]
    assert pool.allocate(1) is None
    stats = pool.prefix_cache_stats()
    assert (stats.queries, stats.hits) == (3, 2)


def test_duplicate_hash_keeps_first_block_and_disabled_cache_finds_nothing() -> None:
    pool = BlockPool(3, 2)
    h = hash_blocks([1, 2], 2)[0]
    a, b = pool.allocate(2) or []
    pool.cache_block(a, h)
    pool.cache_block(b, h)
    assert pool.find_cached([h]) == [a] and pool.block_hash(b) is None
    off = BlockPool(3, 2, enable_caching=False)
    (c,) = off.allocate(1) or []
    off.cache_block(c, h)
    assert off.find_cached([h]) == []
    pool.reset_prefix_cache()
    assert pool.find_cached([h]) == []


def test_bad_sizes_raise() -> None:
    with pytest.raises(ValueError, match="num_kv_blocks"):
        BlockPool(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockPool(4, 0)
