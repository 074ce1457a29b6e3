"""A block pool for simulated workers that never cache prefixes: a free list and nothing else.

`workers.block_pool.BlockPool` keeps an LRU queue of every block (for prefix caching) and builds
it block by block, which at the paper's scale (85,000 blocks per DGX, 70 machines) costs more
than the whole simulated run. Without prefix caching only *how many* blocks are free ever decides
anything, so this pool hands out the same counts from a plain stack. `SimWorker` uses it when
prefix caching is off; tests check that both pools give identical runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from batonserve.workers.block_pool import PrefixCacheStats


class CountingBlockPool:
    """BlockPool's interface, without prefix caching: allocation is a slice of a free stack."""

    enable_caching = False

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Freed blocks are handed out again first (last freed, first out), then never-used ones
        # in ascending order: the order of one stack holding every block, built lazily (a list
        # of 85,000 ids per DGX cost seconds per run at the paper's scale).
        self._free: list[int] = []
        self._fresh = 0  # blocks 0 .. _fresh - 1 have been handed out at least once

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocate() can hand out."""
        return len(self._free) + self.num_blocks - self._fresh

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live requests (0..1)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Always zero: nothing is cached."""
        return PrefixCacheStats(0, 0)

    def find_cached(self, block_hashes: Sequence[int]) -> list[int]:
        """Nothing is ever cached."""
        return []

    def record_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        """No prefix cache, nothing to count."""

    def touch(self, block_ids: Sequence[int]) -> None:
        """Only ever called with cached blocks, of which there are none."""
        assert not block_ids, "a pool without prefix caching has no cached blocks to touch"

    def cache_block(self, block_id: int, block_hash: int) -> None:
        """Prefix caching is off: blocks are never named."""

    def allocate(self, n: int) -> list[int] | None:
        """Take `n` free blocks, or None if too few."""
        if n > self.num_free_blocks:
            return None
        if n <= 0:
            return []
        k = min(n, len(self._free))
        out = self._free[len(self._free) - k :]
        del self._free[len(self._free) - k :]
        out.reverse()
        if k < n:
            out.extend(range(self._fresh, self._fresh + n - k))
            self._fresh += n - k
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Return blocks to the pool (each block has exactly one user without caching)."""
        self._free.extend(reversed(block_ids))
        assert self.num_free_blocks <= self.num_blocks, "double free"
