"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, prefix caching, LRU eviction.

Plain Python (no torch): the cluster simulator drives this very code. A block is `block_size`
token slots of KV in every layer; slot = block_id * block_size + offset.

Prefix caching: a *full* block is named by a chained hash of its parent block's hash and its own
token ids, so equal hashes mean equal whole prefixes. A freed block keeps its hash and stays
findable until it is evicted (reused for new tokens), oldest-freed first.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

ROOT_HASH = 0  # the parent hash of a sequence's first block


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Chained hash of one full block: stable across processes (no Python hash randomisation)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<Q", parent_hash))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return int.from_bytes(h.digest(), "little")


def hash_blocks(
    token_ids: Sequence[int], block_size: int, start: int = 0, parent: int = 0
) -> list[int]:
    """Hashes of the full blocks of `token_ids` from block index `start` (parent = hash before it)."""
    out: list[int] = []
    for b in range(start, len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[b * block_size : (b + 1) * block_size])
        out.append(parent)
    return out


@dataclass(frozen=True)
class PrefixCacheStats:
    """Cumulative prefix-cache counters, in tokens."""

    queries: int
    hits: int


class BlockPool:
    """Owns every KV block of one engine: allocation, reference counts and the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        # Blocks with ref count 0, least recently freed first: allocation takes from the front,
        # so a cached block survives as long as possible.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._queries = 0
        self._hits = 0

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no user (cached or not): what allocate() can hand out."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live requests (0..1)."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently findable by hash."""
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        """Current reference count of a block."""
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> int | None:
        """The block's prefix hash, or None when it is not (or no longer) cached."""
        return self._hash[block_id]

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Cumulative query/hit token counts."""
        return PrefixCacheStats(queries=self._queries, hits=self._hits)

    # ---- prefix cache --------------------------------------------------------------------

    def find_cached(self, block_hashes: Sequence[int]) -> list[int]:
        """Longest leading run of cached blocks matching `block_hashes` (not referenced yet)."""
        found: list[int] = []
        if self.enable_caching:
            for h in block_hashes:
                block_id = self._cached.get(h)
                if block_id is None:
                    break
                found.append(block_id)
        return found

    def record_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted lookup: its length and how many tokens were found cached."""
        self._queries += num_query_tokens
        self._hits += num_hit_tokens

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks (a prefix hit), pulling them out of the free queue."""
        for b in block_ids:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1

    def cache_block(self, block_id: int, block_hash: int) -> None:
        """Name a full, computed block by its prefix hash (first block with a hash wins)."""
        if not self.enable_caching or self._hash[block_id] is not None:
            return
        if block_hash in self._cached:
            return  # another request computed the same prefix concurrently; keep that one
        self._hash[block_id] = block_hash
        self._cached[block_hash] = block_id

    # ---- allocation ----------------------------------------------------------------------

    def allocate(self, n: int) -> list[int] | None:
        """Take `n` free blocks (evicting cached ones, oldest first), or None if too few."""
        if n > len(self._free):
            return None
        out: list[int] = []
        for _ in range(n):
            b, _unused = self._free.popitem(last=False)
            h = self._hash[b]
            if h is not None:  # evict: the block's old contents are about to be overwritten
                del self._cached[h]
                self._hash[b] = None
            assert self._ref[b] == 0
            self._ref[b] = 1
            out.append(b)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference per block; blocks reaching 0 join the free queue.

        Freed in reverse so a sequence's tail blocks are evicted before its head blocks (the
        head is the part other requests are most likely to share).
        """
        for b in reversed(block_ids):
            assert self._ref[b] > 0, f"double free of block {b}"
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after new weights are loaded)."""
        for b in self._cached.values():
            self._hash[b] = None
        self._cached.clear()
