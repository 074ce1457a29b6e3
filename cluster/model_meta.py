"""What the router process needs about the model: ModelInfo and the output processor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from batonserve.cluster.api import ModelInfo
from batonserve.cluster.config import ConfigError, ServeConfig
from batonserve.workers.models.config import ModelConfig
from batonserve.workers.models.paths import resolve_model_dir
from batonserve.workers.output_processor import OutputProcessor
from batonserve.workers.tokenizer import Tokenizer

if TYPE_CHECKING:
    from batonserve.workers.scripted_engine import ScriptedEngineConfig


def load_model_meta(
    config: ServeConfig, scripted: ScriptedEngineConfig | None
) -> tuple[ModelInfo, OutputProcessor]:
    """Read the model directory's config and tokenizer (no weights) in the router process."""
    if scripted is not None:
        name = config.served_model_name or config.model
        info = ModelInfo(name, "scripted", 1 << 20, scripted.vocab_size, False)
        return info, OutputProcessor(None, (scripted.eos_token_id,))
    model_dir = resolve_model_dir(config.model)
    mc = ModelConfig.from_dir(model_dir)
    ctx = mc.max_position_embeddings
    if config.engine.max_model_len:
        ctx = min(ctx, config.engine.max_model_len)
    info = ModelInfo(
        name=config.served_model_name or model_dir.name,
        architecture=mc.architecture,
        context_length=ctx,
        vocab_size=mc.vocab_size,
        is_moe=mc.is_moe,
    )
    return info, OutputProcessor(Tokenizer.from_model_dir(model_dir), mc.eos_token_ids)


def check_model_expert_parallel(config: ServeConfig) -> None:
    """ConfigError naming engine.expert_parallel_size when the model cannot be sharded that way."""
    from batonserve.workers.parallel.ep_slice import check_expert_parallel

    model_dir = resolve_model_dir(config.model)
    try:
        check_expert_parallel(config.engine, ModelConfig.from_dir(model_dir), model_dir.name)
    except ValueError as e:
        raise ConfigError(f"engine.{e}") from None


def check_model_tensor_parallel(config: ServeConfig) -> None:
    """ConfigError naming the pool whose tensor_parallel_size cannot shard the model's heads or
    widths (refused before any worker starts, instead of by every rank at load)."""
    from batonserve.workers.tp.shard import check_tp

    mc = ModelConfig.from_dir(resolve_model_dir(config.model))
    for i, pool in enumerate(config.pools):
        try:
            check_tp(mc, pool.tensor_parallel_size)
        except ValueError as e:
            raise ConfigError(f"pools[{i}].{e}") from None
