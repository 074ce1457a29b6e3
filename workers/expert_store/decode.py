"""A minimal greedy decode loop over a ModelRunner (trace recording and benchmarks).

Each sequence owns a fixed, contiguous run of KV blocks; prompts are prefilled in one forward, then
every step decodes one token per sequence. The serving engine has its own scheduler; this loop only
needs to be deterministic so runs with different expert stores can be compared token for token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from batonserve.workers.forward_batch import ForwardBatch
from batonserve.workers.model_runner import ModelRunner


@dataclass
class DecodeResult:
    """Generated tokens per sequence, and forward timings."""

    tokens: list[list[int]]
    logits: list[torch.Tensor] = field(default_factory=list)  # per forward [B, vocab] float32
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)  # per decode step


def make_batch(
    runner: ModelRunner,
    seqs: Sequence[Sequence[int]],
    starts: Sequence[int],
    blocks_per_seq: int,
    slot_runs: Sequence[int] | None = None,
) -> ForwardBatch:
    """Rows for tokens seqs[i][starts[i]:] of each sequence i, logits at each last row.

    Sequence i uses KV run `slot_runs[i]` (default i): blocks slot_runs[i] * blocks_per_seq on.
    """
    slot_ids = list(range(len(seqs))) if slot_runs is None else list(slot_runs)
    bs = runner.block_size
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    cu = [0]
    for i, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        base = slot_ids[i] * blocks_per_seq * bs  # sequence i's blocks are contiguous
        ids += seq[start:]
        pos += list(range(start, len(seq)))
        slots += [base + p for p in range(start, len(seq))]
        cu.append(len(ids))
    lens = [len(s) for s in seqs]
    tables = [[i * blocks_per_seq + j for j in range(blocks_per_seq)] for i in slot_ids]
    q = [len(s) - st for s, st in zip(seqs, starts, strict=True)]
    return ForwardBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64),
        positions=torch.tensor(pos, dtype=torch.int64),
        cu_query_lens=torch.tensor(cu, dtype=torch.int32),
        context_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        logits_indices=torch.tensor(cu[1:], dtype=torch.int64) - 1,
        max_query_len=max(q),
        max_context_len=max(lens),
    )


def greedy_decode(
    runner: ModelRunner,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    keep_logits: bool = False,
    after_prefill: Callable[[], None] | None = None,
) -> DecodeResult:
    """Greedy-decode every prompt together (one batch); returns tokens and timings."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: need at least one non-empty prompt")
    total = max(len(p) for p in prompts) + max_new_tokens
    blocks_per_seq = -(-total // runner.block_size)
    if blocks_per_seq * len(prompts) > runner.num_blocks:
        raise ValueError(f"num_kv_blocks: {runner.num_blocks} blocks cannot hold this batch")
    seqs = [list(p) for p in prompts]
    out = DecodeResult(tokens=[[] for _ in prompts])
    starts = [0] * len(seqs)
    for step in range(max_new_tokens):
        t0 = time.perf_counter()
        logits = runner.execute(make_batch(runner, seqs, starts, blocks_per_seq))  # [B, vocab]
        dt = time.perf_counter() - t0
        if step == 0:
            out.prefill_s = dt
            if after_prefill is not None:
                after_prefill()
        else:
            out.decode_s.append(dt)
        if keep_logits:
            out.logits.append(logits)
        nxt = logits.argmax(-1).tolist()
        for i, tok in enumerate(nxt):
            starts[i] = len(seqs[i])
            seqs[i].append(int(tok))
            out.tokens[i].append(int(tok))
    return out
