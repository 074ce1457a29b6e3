"""Test helper: hand-built ForwardBatches over a tiny block allocator (shuffled block ids)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from batonserve.workers.forward_batch import ForwardBatch


@dataclass
class PagedSeqs:
    """Sequences with block tables; `step` appends tokens and returns the batch that computes them."""

    block_size: int
    num_blocks: int
    seed: int = 0
    tokens: list[list[int]] = field(default_factory=list)
    tables: list[list[int]] = field(default_factory=list)
    free: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.free = list(range(self.num_blocks))
        random.Random(self.seed).shuffle(self.free)  # non-contiguous blocks catch indexing bugs

    def add(self) -> int:
        """A new empty sequence; returns its id."""
        self.tokens.append([])
        self.tables.append([])
        return len(self.tokens) - 1

    def slot(self, seq: int, pos: int) -> int:
        """Cache slot of position `pos` of sequence `seq`."""
        return self.tables[seq][pos // self.block_size] * self.block_size + pos % self.block_size

    def step(self, new: dict[int, list[int]], all_logits: bool = False) -> ForwardBatch:
        """Append `new[seq]` tokens to each listed sequence; logits for every row or each last row."""
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        cu = [0]
        ctx: list[int] = []
        last: list[int] = []
        for seq, toks in new.items():
            start = len(self.tokens[seq])
            self.tokens[seq].extend(toks)
            while len(self.tables[seq]) * self.block_size < len(self.tokens[seq]):
                self.tables[seq].append(self.free.pop())
            ids += toks
            pos += list(range(start, start + len(toks)))
            slots += [self.slot(seq, p) for p in range(start, start + len(toks))]
            cu.append(cu[-1] + len(toks))
            ctx.append(len(self.tokens[seq]))
            last.append(cu[-1] - 1)
        width = max(len(self.tables[s]) for s in new) + 1  # one padding column
        tables = [self.tables[s] + [0] * (width - len(self.tables[s])) for s in new]
        q_lens = [len(t) for t in new.values()]
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.tensor(pos, dtype=torch.int64),
            cu_query_lens=torch.tensor(cu, dtype=torch.int32),
            context_lens=torch.tensor(ctx, dtype=torch.int32),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            logits_indices=torch.arange(len(ids)) if all_logits else torch.tensor(last),
            max_query_len=max(q_lens),
            max_context_len=max(ctx),
        )
