"""Entry point of one spawned gloo rank: the SP forward of its shard vs the single-process forward."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist


def run_rank(
    rank: int, world: int, model_dir: str, tmp: str, length: int, layout: str, schedule: str | None
) -> None:
    """Compare this rank's K/V rows (every layer) and, on the last position's rank, the logits."""
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    store = dist.FileStore(str(Path(tmp) / "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        from batonserve.workers.config import EngineConfig
        from batonserve.workers.forward_batch import ForwardBatch
        from batonserve.workers.model_runner import ModelRunner
        from batonserve.workers.parallel import SPGroup, shard_batch
        from batonserve.workers.sp_serving.forward import (
            SPForward,
            attention_dims,
            sp_prefill_forward,
        )

        bs = 4
        runner = ModelRunner(
            model_dir, EngineConfig(dtype="float32", device="cpu", block_size=bs, num_kv_blocks=128)
        )
        g = torch.Generator().manual_seed(7)
        prompt = torch.randint(3, 300, (length,), generator=g)
        # Reference: the whole prompt on one process, blocks 0.. (slots 0..length-1).
        nblk = math.ceil(length / bs)
        ref_batch = ForwardBatch(
            input_ids=prompt,
            positions=torch.arange(length),
            cu_query_lens=torch.tensor([0, length], dtype=torch.int32),
            context_lens=torch.tensor([length], dtype=torch.int32),
            block_tables=torch.arange(nblk, dtype=torch.int32)[None],
            slot_mapping=torch.arange(length),
            logits_indices=torch.tensor([length - 1]),
            max_query_len=length,
            max_context_len=length,
        )
        ref_logits = runner.execute(ref_batch)
        ref_kv = [
            runner.read_kv(i, torch.arange(length)) for i in range(runner.model_config.num_layers)
        ]
        # This rank's shard into other blocks (compact local rows, starting at block 64).
        shard = shard_batch([length], None, world, rank, layout=layout)
        pos = shard.spec.q_pos
        slots = 64 * bs + torch.arange(pos.shape[0])
        last = (pos == length - 1).nonzero()[:, 0]
        sp = SPForward(SPGroup(timeout_s=30), shard.spec, attention_dims(runner), schedule)
        hooked: list[int] = []
        logits = sp_prefill_forward(runner, prompt[pos], pos, slots, sp, last, hooked.append)
        assert hooked == list(range(runner.model_config.num_layers))
        for i, (rk, rv) in enumerate(ref_kv):
            k, v = runner.read_kv(i, slots)
            torch.testing.assert_close(k, rk[pos], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(v, rv[pos], rtol=1e-4, atol=1e-4)
        if last.numel():
            torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
            assert int(logits.argmax()) == int(ref_logits.argmax())
        else:
            assert logits.shape[0] == 0
        assert len(sp.metrics) == runner.model_config.num_layers
        out = {"rank": rank, "schedule": sp.schedule_used, "has_last": bool(last.numel())}
        (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()
