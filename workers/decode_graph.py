"""A captured decode step: the model's decode forward compiled per batch-size bucket.

Decode-only batches (one new token per sequence) are padded up to the next bucket (1, 2, 4, ...
up to max_num_seqs) and run through a graph captured for that bucket, with every input in a
static buffer, as vLLM and SGLang do with CUDA graphs:

- "inductor": `torch.compile(fullgraph=True, dynamic=False)` of `model.forward_decode`, weights
  frozen (inductor packs them for its own GEMMs); CPU or GPU.
- "cudagraph": `torch.cuda.CUDAGraph` capture of the eager decode forward (CUDA only).
- "eager": the same padded path without capture (tests, debugging).

Padded rows write their K/V to a scratch block the block pool never hands out and attend to that
one key; their logits are dropped. Anything else (prefill, mixed batches, a layer hook, more
sequences than the largest bucket, a model without `forward_decode`) runs the eager forward.
Warm-up captures every bucket at start-up, printing a progress line per bucket; a bucket that
fails to capture is left to the eager forward (logged), so a failure costs speed, not service.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from batonserve.workers.forward_batch import ForwardBatch

log = logging.getLogger(__name__)

MODES = ("", "inductor", "cudagraph", "eager")


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """Powers of two up to max_num_seqs, and max_num_seqs itself."""
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return [*sizes, max_num_seqs]


class DecodeGraphs:
    """Padded, per-bucket captured decode forwards over one model and its KV cache."""

    def __init__(
        self,
        model: Any,
        kv_cache: torch.Tensor,
        block_size: int,
        scratch_block: int,
        max_num_seqs: int,
        table_width: int,
        mode: str,
        buckets: tuple[int, ...] = (),
    ) -> None:
        if mode not in MODES[1:]:
            raise ValueError(f"compile_decode: unknown mode {mode!r}; use one of {list(MODES)}")
        if mode == "cudagraph" and kv_cache.device.type != "cuda":
            raise ValueError("compile_decode: 'cudagraph' needs a CUDA device; use 'inductor'")
        self.model, self.kv_cache, self.block_size, self.mode = model, kv_cache, block_size, mode
        if buckets and (list(buckets) != sorted(set(buckets)) or buckets[0] < 1):
            raise ValueError(f"compile_decode_buckets: need ascending sizes >= 1, got {buckets!r}")
        self.buckets = list(buckets) or bucket_sizes(max_num_seqs)
        self.table_width = table_width
        self.scratch_slot = scratch_block * block_size
        dev, n = kv_cache.device, self.buckets[-1]
        # Static inputs: every bucket reads a leading slice, so a captured graph sees fixed addresses.
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=dev)
        self.tables = torch.full((n, table_width), scratch_block, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.runners: dict[int, Callable[[], torch.Tensor]] = {}
        self._compiled: Callable[..., torch.Tensor] | None = None
        if mode == "inductor":
            import torch._dynamo as dynamo

            cfg = dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):  # one graph per bucket
                if hasattr(cfg, name):
                    setattr(cfg, name, max(getattr(cfg, name), 2 * len(self.buckets) + 8))
            self._compiled = torch.compile(model.forward_decode, fullgraph=True, dynamic=False)

    def _args(self, b: int) -> tuple[Any, ...]:
        return (
            self.input_ids[:b],
            self.positions[:b],
            self.slots[:b],
            self.tables[:b],
            self.context_lens[:b],
            self.kv_cache,
            self.block_size,
        )

    def warm_up(self) -> None:
        """Capture every bucket now (minutes for inductor on a small CPU), one line per bucket."""
        total = len(self.buckets)
        for i, b in enumerate(self.buckets):
            t0 = time.perf_counter()
            try:
                self.runners[b] = self._capture(b)
            except Exception as e:
                log.warning("decode graph for batch %d not captured (%s); it runs eager", b, e)
                print(
                    f"decode graphs ({self.mode}): batch {b} failed, eager ({e})", file=sys.stderr
                )
                continue
            print(
                f"decode graphs ({self.mode}): batch {b} captured ({i + 1}/{total}, "
                f"{time.perf_counter() - t0:.1f}s)",
                file=sys.stderr,
                flush=True,
            )

    def _capture(self, b: int) -> Callable[[], torch.Tensor]:
        args = self._args(b)
        with torch.inference_mode():
            if self.mode == "eager":
                return lambda: self.model.forward_decode(*args)
            if self.mode == "inductor":
                import torch._inductor.config as inductor_config

                assert self._compiled is not None
                compiled = self._compiled
                with inductor_config.patch(freezing=True):
                    compiled(*args)  # compiles for this shape
                return lambda: compiled(*args)
            # cudagraph: warm up on a side stream, then capture one replayable launch sequence.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.model.forward_decode(*args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.model.forward_decode(*args)

            def replay() -> torch.Tensor:
                graph.replay()
                return out

            return replay

    def bucket_for(self, batch: ForwardBatch) -> int | None:
        """The bucket this batch runs in, or None when it must run eager."""
        n = batch.num_seqs
        if not batch.is_decode_only or n > self.buckets[-1]:
            return None
        if batch.block_tables.shape[1] > self.table_width or batch.num_tokens != n:
            return None
        if batch.logits_indices.shape[0] != n:
            return None
        b = next(x for x in self.buckets if x >= n)
        return b if b in self.runners else None

    def run(self, batch: ForwardBatch, b: int) -> torch.Tensor:
        """Logits [n, vocab] float32 of a decode batch through bucket b's graph."""
        n, w = batch.num_seqs, batch.block_tables.shape[1]
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slots[:n].copy_(batch.slot_mapping)
        self.tables[:n, :w].copy_(batch.block_tables)
        self.context_lens[:n].copy_(batch.context_lens)
        if n < b:  # padded rows: one key, in the scratch block
            self.input_ids[n:b].zero_()
            self.positions[n:b].zero_()
            self.slots[n:b].fill_(self.scratch_slot)
            self.tables[n:b, 0].fill_(self.scratch_slot // self.block_size)
            self.context_lens[n:b].fill_(1)
        logits = self.runners[b]()[:n]  # bucket_for checked: one logits row per sequence
        # A replayed CUDA graph overwrites its output next step: hand out a copy.
        return logits.clone() if self.mode == "cudagraph" else logits
