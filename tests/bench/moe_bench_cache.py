"""Part of bench_moe.py: hit rate, stall and decode time vs cache size for each policy."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from batonserve.workers.config import EngineConfig
from batonserve.workers.expert_store import (
    ExpertStore,
    PolicyContext,
    RoutingPredictor,
    StoreConfig,
    attach_resident,
    attach_store,
    default_predictor_path,
)
from batonserve.workers.expert_store.decode import DecodeResult, greedy_decode
from batonserve.workers.expert_store.disk import DiskTier
from batonserve.workers.expert_store.simulate import demand_sequence, group_ends_of, simulate
from batonserve.workers.model_runner import ModelRunner

MODEL = "demo-moe"


@dataclass
class CacheRow:
    """One (policy, cache size) measurement."""

    policy: str
    fraction: float
    hit_rate: float
    stall_ms_per_token: float
    decode_ms_per_token: float
    peak_resident_bytes: int
    prefetch_precision: float
    prefetch_recall: float
    disk_mb: float
    same_tokens: bool
    same_logits: bool


def runner(num_kv_blocks: int = 256) -> ModelRunner:
    """A fresh demo-moe runner (fp16 checkpoint dtype, CPU)."""
    return ModelRunner(
        MODEL, EngineConfig(device="cpu", num_kv_blocks=num_kv_blocks, block_size=16)
    )


def decode_all(r: ModelRunner, prompts: list[list[int]], new: int) -> list[DecodeResult]:
    """Batch-1 decode of each prompt in turn (the store persists across prompts)."""
    return [greedy_decode(r, [p], new, keep_logits=True) for p in prompts]


def per_token_ms(results: list[DecodeResult]) -> float:
    """Median decode step time in ms."""
    return 1e3 * statistics.median(t for res in results for t in res.decode_s)


def same(a: list[DecodeResult], b: list[DecodeResult]) -> tuple[bool, bool]:
    """(tokens equal, logits bitwise equal)."""
    toks = all(x.tokens == y.tokens for x, y in zip(a, b, strict=True))
    logits = all(
        torch.equal(p, q)
        for x, y in zip(a, b, strict=True)
        for p, q in zip(x.logits, y.logits, strict=True)
    )
    return toks, logits


def run_cache(prompts: list[list[int]], new: int, fractions: list[float]) -> dict[str, object]:
    """Every policy at every cache size on one trace; Belady replayed offline on that trace."""
    r = runner()
    ctl = attach_resident(r.model)
    t0 = time.perf_counter()
    ref = decode_all(r, prompts, new)
    ref_ms = per_token_ms(ref)
    ids = [rec.ids for rec in ctl.records]
    demands = demand_sequence(ids)
    ends = group_ends_of(ids)
    mc = r.model_config
    pred = RoutingPredictor.load(default_predictor_path(MODEL))
    ctx = PolicyContext(mc.num_layers, mc.num_local_experts, pred.popularity_counts(), None)
    disk = DiskTier(r.model_dir, "float16")
    expert_bytes = disk.read(disk_key()).nbytes
    total = expert_bytes * mc.num_layers * mc.num_local_experts
    rows: list[CacheRow] = []
    for frac in fractions:
        cap = max(1, int(frac * mc.num_layers * mc.num_local_experts))
        for policy, prefetch in (("lru", False), ("popularity", False), ("predictive", True)):
            cfg = StoreConfig(
                fast_budget_bytes=cap * expert_bytes,
                policy=policy,
                prefetch=prefetch,
                drop_page_cache=True,
            )
            rs = runner()
            store = ExpertStore(rs.model_dir, cfg, ctx)
            store.disk.drop_all()  # cold page cache before each measured run
            attach_store(rs.model, store, pred if policy == "predictive" else None)
            out = decode_all(rs, prompts, new)
            store.drain()
            store.close()
            st = store.stats
            toks, logits = same(out, ref)
            rows.append(
                CacheRow(
                    policy,
                    frac,
                    st.hit_rate,
                    1e3 * st.stall_per_token_s,
                    per_token_ms(out),
                    st.peak_resident_bytes,
                    st.prefetch_precision,
                    st.prefetch_recall,
                    st.tiers["disk"].bytes_in / 1e6,
                    toks,
                    logits,
                )
            )
            print(
                f"  {policy:10s} {frac:4.0%}: hit {st.hit_rate:.3f}  stall "
                f"{rows[-1].stall_ms_per_token:.3f} ms/tok  decode {rows[-1].decode_ms_per_token:.2f} ms/tok  "
                f"same tokens {toks} logits {logits}",
                flush=True,
            )
        sim = simulate(demands, cap, "belady", ctx, group_ends=ends)
        lru = simulate(demands, cap, "lru", ctx, group_ends=ends)
        rows.append(
            CacheRow(
                "belady",
                frac,
                sim.hit_rate,
                float("nan"),
                float("nan"),
                cap * expert_bytes,
                0.0,
                0.0,
                float("nan"),
                True,
                True,
            )
        )
        print(
            f"  belady     {frac:4.0%}: hit {sim.hit_rate:.3f} (offline; lru replay {lru.hit_rate:.3f})",
            flush=True,
        )
    ref2 = decode_all(_resident_again(), prompts, new)  # resident again: the noise floor
    return {
        "rows": rows,
        "resident_ms_per_token": ref_ms,
        "resident_ms_per_token_again": per_token_ms(ref2),
        "expert_bytes": expert_bytes,
        "all_expert_bytes": total,
        "demands": len(demands),
        "tokens": sum(len(p) + new - 1 for p in prompts),
        "seconds": time.perf_counter() - t0,
    }


def _resident_again() -> ModelRunner:
    """A second all-resident runner."""
    return runner()


def disk_key():  # type: ignore[no-untyped-def]
    """Layer 0, expert 0."""
    from batonserve.workers.expert_store import ExpertKey

    return ExpertKey(0, 0)


def run_memory(prompts: list[list[int]], new: int, fractions: list[float]) -> dict[str, object]:
    """Decode time per token, all-resident vs store (predictive + prefetch), interleaved per prompt.

    The runs take turns prompt by prompt (rotating who goes first), so machine load drifts hit all
    of them alike; each keeps its own cache across prompts.
    """
    pred = RoutingPredictor.load(default_predictor_path(MODEL))
    base = runner()
    attach_resident(base.model)
    mc = base.model_config
    ctx = PolicyContext(mc.num_layers, mc.num_local_experts, pred.popularity_counts(), None)
    expert_bytes = DiskTier(base.model_dir, "float16").read(disk_key()).nbytes
    runs: dict[str, ModelRunner] = {"resident": base}
    stores: dict[str, ExpertStore] = {}
    for frac in fractions:
        cap = max(1, int(frac * mc.num_layers * mc.num_local_experts))
        cfg = StoreConfig(cap * expert_bytes, "predictive", prefetch=True, drop_page_cache=True)
        rs = runner()
        stores[f"{frac:.0%}"] = store = ExpertStore(rs.model_dir, cfg, ctx)
        store.disk.drop_all()
        attach_store(rs.model, store, pred)
        runs[f"{frac:.0%}"] = rs
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    outs: dict[str, list[DecodeResult]] = {n: [] for n in names}
    for i, p in enumerate(prompts):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            res = greedy_decode(runs[name], [p], new, keep_logits=True)
            times[name] += res.decode_s
            outs[name].append(res)
    for store in stores.values():
        store.close()
    total = expert_bytes * mc.num_layers * mc.num_local_experts
    out: dict[str, object] = {"resident_ms": 1e3 * statistics.median(times["resident"])}
    for name, store in stores.items():
        toks, logits = same(outs[name], outs["resident"])
        out[name] = {
            "ms": 1e3 * statistics.median(times[name]),
            "ratio": statistics.median(times[name]) / statistics.median(times["resident"]),
            "saved": 1 - store.stats.peak_resident_bytes / total,
            "hit_rate": store.stats.hit_rate,
            "same_tokens": toks,
            "same_logits": logits,
        }
    return out
