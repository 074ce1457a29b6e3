"""Per-worker engine configuration (the cluster config embeds it as its `engine` section)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from batonserve.workers.expert_store.policies import SERVING_POLICIES
from batonserve.workers.models.config import DTYPES
from batonserve.workers.plugins import choices

# What a worker does in the Splitwise split: the one definition (the mixed pool flips a worker's
# role without reloading weights).
Role = Literal["prefill", "decode", "mixed"]

# The cache policies a serving engine may use (the registry's, less the offline-only ones).
EXPERT_CACHE_POLICIES = SERVING_POLICIES
# EngineConfig.cpu_gemm; the last three are the weight layouts of kernels/linear.py's pack_weight.
CPU_GEMMS = ("auto", "onednn", "fp32_panels", "dot_panels")


@dataclass(frozen=True)
class EngineConfig:
    """Per-worker engine limits (the machine-level scheduler and the KV cache)."""

    # auto: bf16 on a CPU with native bf16 matmul (AVX-512-BF16/AMX), else fp32 on CPU; the
    # checkpoint's dtype on GPU. The KV cache is kept in the same dtype.
    dtype: str = field(default="auto", metadata=choices(("auto", *DTYPES)))
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    # CPU threads of this engine's ops; 0 keeps torch's default, which in a Ray actor is the
    # actor's num_cpus (Ray sets OMP_NUM_THREADS from it).
    num_threads: int = 0
    block_size: int = 16
    # Decode steps through a graph captured per batch-size bucket (workers/decode_graph.py):
    # "" off (eager), "inductor" (torch.compile; minutes of warm-up on a small CPU), "cudagraph"
    # (CUDA only), "eager" (the padded path uncaptured: tests). Prefill always runs eager.
    compile_decode: str = ""
    # Batch sizes captured (ascending); () = 1, 2, 4, ... up to max_num_seqs. Fewer buckets, less
    # warm-up; a batch pads to the next bucket, or runs eager above the largest.
    compile_decode_buckets: tuple[int, ...] = ()
    # bf16 on CPU, batches of 4+ rows: the GEMM and the packed layout of the weights (one copy
    # either way). "onednn": oneDNN's packing. "fp32_panels": bf16 panels widened to float32
    # FMAs (kernels/cpu/panel_gemm.py), for an Intel CPU without AMX, whose fp32 FMAs run ~1.9x
    # its bf16 dot products. "dot_panels": bf16 panels of k pairs for AVX-512-BF16 dot products,
    # for AMD Zen 4, where they run 4-32 rows 1.1-1.5x faster than oneDNN. "auto" picks
    # by the CPU's flags: those two, else (AMX, no AVX-512-BF16) oneDNN.
    cpu_gemm: str = field(default="auto", metadata=choices(CPU_GEMMS))
    # Keys of earlier releases, named in the error a config that still uses them gets.
    RENAMED: ClassVar[dict[str, str]] = {
        "cpu_fp32_gemm": "cpu_gemm (on: fp32_panels, off: onednn, auto: auto)"
    }
    # Plan and settle steps while the model runs the next one (vLLM's async scheduling): the
    # scheduler, its update and output processing leave the forward's critical path. Steps with
    # a layer hook (a served worker streaming KV layer by layer) and token regrouping run in
    # lockstep whatever this says.
    async_scheduling: bool = False
    num_kv_blocks: int = 0  # 0 sizes the cache from kv_cache_bytes
    kv_cache_bytes: int = 256 * 1024 * 1024
    max_num_batched_tokens: int = 2048  # Splitwise's prefill batch cap
    max_num_seqs: int = 64
    max_model_len: int = 0  # 0 takes the model's context length
    enable_prefix_caching: bool = True
    seed: int = 0
    # MoE models: "" keeps every expert resident; a policy name serves experts from the tiered
    # store (disk -> RAM -> GPU) with a compute-tier budget of this fraction of expert bytes.
    expert_cache_policy: str = field(default="", metadata=choices(("", *EXPERT_CACHE_POLICIES)))
    expert_cache_fraction: float = 0.25
    expert_prefetch: bool = True  # prefetch the routing predictor's forecasts in the background
    # On a GPU, a host-RAM tier (pinned) between disk and GPU holds up to this fraction of expert
    # bytes (capped at half the host's available memory), so most misses are PCIe copies, not
    # disk reads. 0 turns it off; unused on CPU, where the compute tier already is RAM.
    expert_cache_ram_fraction: float = 0.5
    # Token regrouping (MoE): at most this many decode tokens per step, picked to share forecast
    # experts; 0 runs every decode token every step. No token waits more than max_wait steps.
    moe_regroup_batch: int = 0
    moe_regroup_max_wait: int = 4
    # Expert parallelism (MoE, served only): each worker leads a group of this many processes on
    # its node; attention and KV are replicated, experts sharded. 1 turns it off.
    expert_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype: must be 'auto' or one of {list(DTYPES)}, got {self.dtype!r}")
        nt = self.num_threads
        if isinstance(nt, bool) or not isinstance(nt, int) or nt < 0:
            raise ValueError(f"num_threads: must be an integer >= 0 (0 = default), got {nt!r}")
        if self.cpu_gemm not in CPU_GEMMS:
            raise ValueError(
                f"cpu_gemm: must be one of {', '.join(CPU_GEMMS)}; got {self.cpu_gemm!r}"
            )
        if self.expert_cache_policy not in ("", *EXPERT_CACHE_POLICIES):
            raise ValueError(
                f"expert_cache_policy: unknown policy {self.expert_cache_policy!r}; use one of "
                f"{list(EXPERT_CACHE_POLICIES)} (or '' to keep every expert resident)"
            )
        frac = self.expert_cache_fraction
        if not isinstance(frac, int | float) or not 0.0 < frac <= 1.0:
            raise ValueError(f"expert_cache_fraction: must be in (0, 1], got {frac!r}")
        ram = self.expert_cache_ram_fraction
        if isinstance(ram, bool) or not isinstance(ram, int | float) or not 0.0 <= ram <= 1.0:
            raise ValueError(f"expert_cache_ram_fraction: must be in [0, 1], got {ram!r}")
        if self.moe_regroup_batch < 0:
            raise ValueError(
                f"moe_regroup_batch: must be >= 0 (0 turns regrouping off), got "
                f"{self.moe_regroup_batch}"
            )
        if self.moe_regroup_max_wait < 0:
            raise ValueError(f"moe_regroup_max_wait: must be >= 0, got {self.moe_regroup_max_wait}")
        ep = self.expert_parallel_size
        if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
            raise ValueError(f"expert_parallel_size: must be an integer >= 1 (1 = off), got {ep!r}")
        if ep > 1 and self.expert_cache_policy:
            raise ValueError(
                f"expert_parallel_size: {ep} shards the experts; it cannot be combined with "
                f"expert_cache_policy {self.expert_cache_policy!r} (use one or the other)"
            )
