"""Load Hugging Face safetensors checkpoints (single file or sharded via the index) into a model.

Tensors are read lazily, one at a time, with safetensors' safe_open, and copied (with dtype
conversion) into their destination slice of the model's (possibly fused) parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from batonserve.workers.models.layers import WeightSpecs

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name in the checkpoint to the safetensors file that holds it."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map object")
        return {str(name): model_dir / str(file) for name, file in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        raise ValueError(f"model: {str(model_dir)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    with safe_open(str(single), framework="pt") as f:
        return {str(name): single for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def load_weights(model_dir: Path, specs: WeightSpecs) -> None:
    """Fill every destination in `specs` from the checkpoint; errors name the offending tensor."""
    files = checkpoint_files(model_dir)
    missing = [name for name, _ in specs if name not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"checkpoint in {str(model_dir)!r} is missing tensor {missing[0]!r}{more}")
    by_file: dict[Path, list[tuple[str, torch.Tensor]]] = {}
    for name, dest in specs:
        by_file.setdefault(files[name], []).append((name, dest))
    for path, items in by_file.items():
        if not path.is_file():
            raise ValueError(f"checkpoint shard {str(path)!r} (named in {INDEX_FILE}) not found")
        with safe_open(str(path), framework="pt") as f:
            for name, dest in items:
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise ValueError(
                        f"tensor {name!r}: checkpoint shape {tuple(tensor.shape)} does not match "
                        f"the model's {tuple(dest.shape)} (check config.json)"
                    )
                with torch.no_grad():
                    dest.copy_(tensor)
