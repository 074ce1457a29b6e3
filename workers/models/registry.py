"""Architecture string (config.json `architectures[0]`) -> model class."""

from __future__ import annotations

from batonserve.workers.models.config import SUPPORTED_ARCHITECTURES
from batonserve.workers.models.llama import LlamaForCausalLM
from batonserve.workers.models.mixtral import MixtralForCausalLM
from batonserve.workers.models.qwen2_moe import Qwen2MoeForCausalLM

MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
}
assert set(MODEL_REGISTRY) == set(SUPPORTED_ARCHITECTURES)


def get_model_class(architecture: str) -> type[LlamaForCausalLM]:
    """The model class for `architecture`, or ValueError listing the supported ones."""
    if architecture not in MODEL_REGISTRY:
        raise ValueError(
            f"architectures: unsupported model architecture {architecture!r}; "
            f"supported: {sorted(MODEL_REGISTRY)}"
        )
    return MODEL_REGISTRY[architecture]
