"""A fake model runner for engine tests that need no model math.

Its "KV cache" stores each slot's token id; logits for a row are pseudo-random but a pure function
of the whole context read back *through the block table*, so a wrong block table, slot mapping or
prefix-cache hit changes the output just as it would with a real model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from batonserve.workers.forward_batch import ForwardBatch


@dataclass(frozen=True)
class FakeModelConfig:
    """The fields of ModelRunner.model_config the engine reads."""

    vocab_size: int = 64
    max_position_embeddings: int = 256
    eos_token_ids: tuple[int, ...] = (1,)
    num_layers: int = 2


class FakeRunner:
    """Deterministic runner: logits = f(context tokens as read from the paged cache)."""

    def __init__(self, num_blocks: int = 64, block_size: int = 4, vocab: int = 64) -> None:
        self.model_config = FakeModelConfig(vocab_size=vocab)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = torch.device("cpu")
        self.kv = torch.full((num_blocks * block_size,), -1, dtype=torch.int64)
        self.batches: list[ForwardBatch] = []

    def logits_for(self, context: list[int]) -> torch.Tensor:
        """The logits row a context gets (also used by tests as the reference)."""
        digest = hashlib.blake2b(str(context).encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        return torch.randn(self.model_config.vocab_size, generator=gen) * 3.0

    def execute(
        self, batch: ForwardBatch, layer_hook: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Write the new tokens to their slots, then read each sampled row's context back."""
        self.batches.append(batch)
        self.kv[batch.slot_mapping] = batch.input_ids
        for layer in range(self.model_config.num_layers):
            if layer_hook is not None:
                layer_hook(layer)
        rows = []
        cu = batch.cu_query_lens.tolist()
        for r in batch.logits_indices.tolist():
            i = max(j for j in range(batch.num_seqs) if cu[j] <= r)
            pos = int(batch.positions[r])
            table = batch.block_tables[i].long()
            p = torch.arange(pos + 1)
            slots = table[p // self.block_size] * self.block_size + p % self.block_size
            rows.append(self.logits_for(self.kv[slots].tolist()))
        if not rows:
            return torch.empty(0, self.model_config.vocab_size)
        return torch.stack(rows)

    def read_kv(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The 'KV' (token ids) at slots, as (k, v)."""
        return self.kv[slots].clone(), self.kv[slots].clone()

    def write_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store 'KV' at slots."""
        self.kv[slots] = k


def reference_greedy(runner: FakeRunner, prompt: list[int], n: int) -> list[int]:
    """What greedy decoding must produce on the fake model, computed without any engine."""
    ctx = list(prompt)
    out = []
    for _ in range(n):
        t = int(runner.logits_for(ctx).argmax())
        out.append(t)
        ctx.append(t)
    return out
