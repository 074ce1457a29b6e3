"""ModelRunner: loads a Hugging Face model directory, owns the paged KV cache, runs forwards."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from batonserve.workers.config import EngineConfig
from batonserve.workers.decode_graph import DecodeGraphs
from batonserve.workers.forward_batch import ForwardBatch
from batonserve.workers.forward_context import (
    AttentionMetadata,
    ForwardContext,
    set_forward_context,
)
from batonserve.workers.models.config import DTYPES, ModelConfig
from batonserve.workers.models.loader import load_weights
from batonserve.workers.models.paths import resolve_model_dir
from batonserve.workers.models.registry import get_model_class
from batonserve.workers.tp.shard import TPShard, check_tp

if TYPE_CHECKING:
    from batonserve.workers.expert_store import ExpertStore, MoEController, RoutingPredictor
    from batonserve.workers.regroup import ExpertPath

_DTYPES = {name: getattr(torch, name) for name in DTYPES}


@functools.cache
def _cpuinfo() -> str:
    """/proc/cpuinfo (its vendor and flags), or "" where it cannot be read."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _torch_has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return probe is not None and bool(probe())


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX-512-BF16 or AMX), so bf16 beats fp32."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if (probe is not None and probe()) or _torch_has_amx():
        return True
    flags = _cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_cpu_gemm() -> str:
    """The bf16 GEMM for batches of 4+ rows on this CPU (EngineConfig.cpu_gemm "auto"), by its
    flags (measured: docs/benchmarks.md, fifth and sixth rounds). With AMX, oneDNN's bf16 GEMM
    runs 3-6x fp32. On an Intel CPU with AVX-512-BF16 and no AMX, fp32 FMAs run ~1.9x its bf16
    dot products: "fp32_panels". On AMD Zen 4, dot products over panels run 4-32 rows 1.1-1.5x
    faster than oneDNN and match it above: "dot_panels"."""
    info = _cpuinfo()
    if _torch_has_amx() or "amx_tile" in info or "avx512_bf16" not in info:
        return "onednn"
    if "GenuineIntel" in info:
        return "fp32_panels"
    return "dot_panels" if "AuthenticAMD" in info else "onednn"


def resolve_dtype(dtype: str, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    """The serving dtype: `dtype` as given, or for "auto" bf16 on a CPU with native bf16 matmul,
    fp32 on other CPUs (fp16 has no fast CPU path), and the checkpoint's dtype on accelerators."""
    if dtype == "auto":
        if device.type == "cpu":
            dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
        else:
            dtype = checkpoint_dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: unsupported {dtype!r}; use one of {list(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device: invalid device {device!r} ({e})") from e


class ModelRunner:
    """One model on one device with its paged KV cache: `execute(batch)` returns logits.

    With `tp` (a tensor-parallel rank) it holds that rank's shard of the weights and its KV heads;
    every rank of the group must execute the same batches in the same order.
    """

    def __init__(self, model: str | Path, config: EngineConfig, tp: TPShard | None = None) -> None:
        self.config = config
        self.tp = tp = tp or TPShard()
        self.model_dir = resolve_model_dir(model)
        self.model_config = ModelConfig.from_dir(self.model_dir)
        mc = self.model_config
        if tp.size > 1:
            _check_tp_engine(config, mc, tp.size)
        kv0, kv1 = tp.kv_heads(mc.num_kv_heads)
        self.num_kv_heads = kv1 - kv0  # this rank's KV heads (all of them without TP)
        self.device = resolve_device(config.device)
        if config.num_threads > 0:
            torch.set_num_threads(config.num_threads)  # process-wide: one engine per worker
        self.dtype = resolve_dtype(config.dtype, mc.torch_dtype, self.device)
        dtype_name = str(self.dtype).removeprefix("torch.")
        if config.block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {config.block_size}")
        self.block_size = config.block_size
        with torch.inference_mode():
            # Experts stream into the store's tiers, or each expert-parallel rank reads only its
            # own (parallel/ep_serving.py): they never enter the model whole.
            if (config.expert_cache_policy or config.expert_parallel_size > 1) and mc.is_moe:
                from batonserve.workers.expert_store.loader import load_without_experts

                model_cls = get_model_class(mc.architecture)
                self.model = load_without_experts(
                    model_cls, mc, self.dtype, self.device, self.model_dir, tp
                )
            else:
                self.model = get_model_class(mc.architecture)(mc, self.dtype, self.device, tp)
                load_weights(self.model_dir, self.model.weight_specs())
            self.model.prepack(self._cpu_gemm(config.cpu_gemm))
        self.model.eval()
        self.expert_store: ExpertStore | None = None
        self.moe_controller: MoEController | None = None
        # token id -> forecast experts, for the scheduler's token regrouping (moe_regroup_batch)
        self.token_paths: Callable[[int], ExpertPath] | None = None
        if config.expert_cache_policy or config.moe_regroup_batch:
            self._attach_moe(dtype_name)
        self.num_blocks = self._num_blocks()
        capture = bool(config.compile_decode) and self.model.supports_decode_graph()
        # One allocation for the whole cache: [layers, 2 (k, v), blocks, block_size, kv_heads, d]
        # (this rank's KV heads under TP).
        # With decode graphs, one block more: the scratch block padded rows write to (the block
        # pool only knows num_blocks, so it never hands it out).
        self.kv_cache = torch.zeros(
            mc.num_layers,
            2,
            self.num_blocks + int(capture),
            self.block_size,
            self.num_kv_heads,
            mc.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(mc.num_layers)]
        self.decode_graphs: DecodeGraphs | None = None
        if config.compile_decode and not capture:
            print(f"compile_decode: {mc.architecture} has no decode graph path; eager", flush=True)
        if capture:
            max_len = config.max_model_len or mc.max_position_embeddings
            self.decode_graphs = DecodeGraphs(
                self.model,
                self.kv_cache,
                self.block_size,
                scratch_block=self.num_blocks,
                max_num_seqs=config.max_num_seqs,
                table_width=-(-int(max_len) // self.block_size),
                mode=config.compile_decode,
                buckets=tuple(config.compile_decode_buckets),
            )
            self.decode_graphs.warm_up()

    def _cpu_gemm(self, mode: str) -> str:
        """The packed layout of bf16 weights (kernels/linear.py); a line says so when "auto" picks
        panels."""
        if self.dtype != torch.bfloat16 or self.device.type != "cpu":
            return "onednn"
        if mode != "auto":
            return mode
        layout = default_cpu_gemm()
        if layout != "onednn":
            print(
                f"cpu_gemm: {layout} for bf16 batches of 4+ rows on this CPU "
                "(EngineConfig.cpu_gemm: docs/operations.md)",
                file=sys.stderr,  # stdout may be a command's JSON output
                flush=True,
            )
        return layout

    def _attach_moe(self, dtype_name: str) -> None:
        """Load the routing predictor; set up the tiered store and token paths as configured."""
        from batonserve.workers.expert_store import RoutingPredictor
        from batonserve.workers.expert_store.predictor import TokenPaths
        from batonserve.workers.expert_store.predictor_cache import (
            find_predictor,
            missing_predictor_message,
        )

        cfg = self.config
        setting, value = (  # the setting that asked for it, named in errors
            ("moe_regroup_batch", cfg.moe_regroup_batch)
            if cfg.moe_regroup_batch
            else ("expert_cache_policy", cfg.expert_cache_policy)
        )
        if not self.model_config.is_moe:
            raise ValueError(
                f"{setting}: {value!r} is set but model {self.model_dir.name!r} has no MoE "
                "layers; leave it unset"
            )
        path = find_predictor(self.model_dir)  # the user cache, or the bundled demo-moe one
        # On the model's device: it reads each layer's MoE input there.
        predictor = RoutingPredictor.load(path, self.device) if path is not None else None
        needs = cfg.moe_regroup_batch or cfg.expert_cache_policy in ("popularity", "predictive")
        if predictor is None and needs:
            raise ValueError(
                f"{setting}: {value!r} needs a routing predictor: "
                + missing_predictor_message(self.model_dir)
            )
        if cfg.expert_cache_policy:
            self._attach_expert_store(dtype_name, predictor)
        if cfg.moe_regroup_batch and predictor is not None:
            self.token_paths = TokenPaths(predictor, self.model.embed)

    def _attach_expert_store(self, dtype_name: str, predictor: RoutingPredictor | None) -> None:
        """Serve the experts from the tiered store (config.expert_cache_*); frees the stacked ones."""
        from batonserve.workers.expert_store import (
            ExpertStore,
            PolicyContext,
            StoreConfig,
            attach_store,
        )
        from batonserve.workers.expert_store.loader import ram_budget_bytes, warm_order
        from batonserve.workers.expert_store.moe_block import sparse_moe_layers
        from batonserve.workers.tp.expert_store import rank_expert_slice

        cfg = self.config
        layers = sparse_moe_layers(self.model)
        # Budget: a fraction of every expert's bytes (stacked w_gate_up [E, 2I, D] + w_down [E, D, I]);
        # under TP, of this rank's slices (I is its share), so the budget is per rank.
        total = sum(
            t.numel() * t.element_size() for _, m in layers for t in (m.w_gate_up, m.w_down)
        )
        ctx = PolicyContext(
            len(layers),
            self.model_config.num_local_experts,
            popularity=predictor.popularity_counts() if predictor is not None else None,
        )
        store_cfg = StoreConfig(
            fast_budget_bytes=int(cfg.expert_cache_fraction * total),
            policy=cfg.expert_cache_policy,
            prefetch=cfg.expert_prefetch and predictor is not None,
            prefetch_lockstep=self.tp.size > 1,  # ranks must hold the same experts
            ram_budget_bytes=ram_budget_bytes(cfg.expert_cache_ram_fraction, total, self.device),
            device=str(self.device),
            dtype=dtype_name,
            expert_slice=rank_expert_slice(self.model, self.tp),
        )
        self.expert_store = ExpertStore(self.model_dir, store_cfg, ctx)
        self.moe_controller = attach_store(self.model, self.expert_store, predictor)
        self.moe_controller.forecast_from_embed = self.tp.size == 1  # a TP embedding is a shard
        mc = self.model_config
        self.expert_store.warm(warm_order(mc.num_layers, mc.num_local_experts, ctx.popularity))

    def close(self) -> None:
        """Stop the expert store's prefetch thread and close its files (when one is attached)."""
        if self.expert_store is not None:
            self.expert_store.close()

    @property
    def tokenizer_path(self) -> Path:
        """The model directory's tokenizer.json."""
        return self.model_dir / "tokenizer.json"

    def _num_blocks(self) -> int:
        """config.num_kv_blocks, or as many blocks as fit in config.kv_cache_bytes."""
        if self.config.num_kv_blocks > 0:
            return self.config.num_kv_blocks
        mc = self.model_config
        elem = torch.empty((), dtype=self.dtype).element_size()
        per_block = 2 * mc.num_layers * self.block_size * self.num_kv_heads * mc.head_dim * elem
        blocks = self.config.kv_cache_bytes // per_block
        if blocks < 1:
            raise ValueError(
                f"kv_cache_bytes: {self.config.kv_cache_bytes} is smaller than one KV block "
                f"({per_block} bytes); raise it or set num_kv_blocks"
            )
        return int(blocks)

    def _to_device(self, batch: ForwardBatch) -> ForwardBatch:
        """The batch with its tensors on the runner's device (a no-op on CPU)."""
        if batch.input_ids.device == self.device:
            return batch
        dev = self.device
        return ForwardBatch(
            input_ids=batch.input_ids.to(dev, non_blocking=True),
            positions=batch.positions.to(dev, non_blocking=True),
            cu_query_lens=batch.cu_query_lens.to(dev, non_blocking=True),
            context_lens=batch.context_lens.to(dev, non_blocking=True),
            block_tables=batch.block_tables.to(dev, non_blocking=True),
            slot_mapping=batch.slot_mapping.to(dev, non_blocking=True),
            logits_indices=batch.logits_indices.to(dev, non_blocking=True),
            max_query_len=batch.max_query_len,
            max_context_len=batch.max_context_len,
        )

    def execute(
        self, batch: ForwardBatch, layer_hook: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Run one forward; returns float32 logits [len(batch.logits_indices), vocab].

        `layer_hook(i)` runs right after layer i's new K/V are in the cache.
        """
        with torch.inference_mode():
            batch = self._to_device(batch)
            graphs = self.decode_graphs
            if graphs is not None and layer_hook is None:
                bucket = graphs.bucket_for(batch)
                if bucket is not None:
                    return graphs.run(batch, bucket)
            ctx = ForwardContext(
                batch=batch,
                attn=AttentionMetadata(batch, self.block_size),
                kv_caches=self.kv_caches,
                layer_hook=layer_hook,
            )
            with set_forward_context(ctx):
                return self.model(batch.input_ids, batch.positions, batch.logits_indices)

    def read_kv(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy out layer `layer`'s K and V at `slots` (block_id * block_size + offset): [n, Hkv, d] each
        (Hkv: this rank's KV heads)."""
        hkv, d = self.num_kv_heads, self.model_config.head_dim
        k_cache, v_cache = self.kv_caches[layer]
        idx = slots.to(self.device, torch.long)
        return k_cache.view(-1, hkv, d)[idx].clone(), v_cache.view(-1, hkv, d)[idx].clone()

    def write_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K and V [n, Hkv, d] of layer `layer` at `slots` (the inverse of read_kv)."""
        hkv, d = self.num_kv_heads, self.model_config.head_dim
        k_cache, v_cache = self.kv_caches[layer]
        idx = slots.to(self.device, torch.long)
        with torch.inference_mode():
            k_cache.view(-1, hkv, d).index_copy_(0, idx, k.to(self.device, self.dtype))
            v_cache.view(-1, hkv, d).index_copy_(0, idx, v.to(self.device, self.dtype))

    def parameter_bytes(self) -> int:
        """Bytes of this rank's resident model parameters (tied tensors counted once)."""
        seen = {id(p): p for p in self.model.parameters()}
        return sum(p.numel() * p.element_size() for p in seen.values())


def _check_tp_engine(config: EngineConfig, mc: ModelConfig, size: int) -> None:
    """ValueError for what tensor parallelism cannot run with (the model's shapes, other modes)."""
    check_tp(mc, size)
    # The expert store works per rank (workers/tp/expert_store.py). EP would split the experts a
    # second way, and regrouping reads the embedding table, which TP splits by vocab.
    for name, on in (
        ("expert_parallel_size", config.expert_parallel_size > 1),
        ("moe_regroup_batch", config.moe_regroup_batch),
    ):
        if on:
            raise ValueError(
                f"{name}: cannot be combined with tensor_parallel_size {size} (under TP every "
                "rank holds a slice of every expert); leave it unset"
            )
