"""Architecture string (config.json `architectures[0]`) -> model class: the one list of supported
architectures. Torch-free until a model is built, so configs and the router can check names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from batonserve.workers.plugins import Registry

if TYPE_CHECKING:
    from batonserve.workers.models.llama import LlamaForCausalLM

ARCHITECTURES: Registry[type[LlamaForCausalLM]] = Registry(
    "model architecture",
    "architectures",
    "batonserve.workers.models",
    {
        "LlamaForCausalLM": "llama:LlamaForCausalLM",
        "MistralForCausalLM": "llama:LlamaForCausalLM",
        "Qwen2ForCausalLM": "llama:LlamaForCausalLM",
        "MixtralForCausalLM": "mixtral:MixtralForCausalLM",
        "Qwen2MoeForCausalLM": "qwen2_moe:Qwen2MoeForCausalLM",
    },
)


def get_model_class(architecture: str) -> type[LlamaForCausalLM]:
    """The model class for `architecture`, or ValueError listing the supported ones."""
    return ARCHITECTURES.get(architecture)
