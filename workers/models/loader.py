"""Load Hugging Face safetensors checkpoints (single file or sharded via the index) into a model.

Tensors are read lazily, one at a time, with safetensors' safe_open, and copied (with dtype
conversion) into their destination slice of the model's (possibly fused) parameters. A spec with
a region (a tensor-parallel shard) reads only those rows or columns (`get_slice`), so no rank
ever holds a whole tensor; a destination taller than its region (vocab padding) is zero-filled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from batonserve.workers.models.layers import WeightSpecs
from batonserve.workers.tp.shard import Region

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
    missing = [spec[0] for spec in specs if spec[0] not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"checkpoint in {str(model_dir)!r} is missing tensor {missing[0]!r}{more}")
    by_file: dict[Path, WeightSpecs] = {}
    for spec in specs:
        by_file.setdefault(files[spec[0]], []).append(spec)
    for path, items in by_file.items():
        if not path.is_file():
            raise ValueError(f"checkpoint shard {str(path)!r} (named in {INDEX_FILE}) not found")
        with safe_open(str(path), framework="pt") as f:
            for spec in items:
                name, dest = spec[0], spec[1]
                if len(spec) == 3:
                    _copy_region(f, name, dest, spec[2])  # type: ignore[misc]
                    continue
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise ValueError(
                        f"tensor {name!r}: checkpoint shape {tuple(tensor.shape)} does not match "
                        f"the model's {tuple(dest.shape)} (check config.json)"
                    )
                with torch.no_grad():
                    dest.copy_(tensor)


def _copy_region(f: Any, name: str, dest: torch.Tensor, region: Region) -> None:
    """Read only [start, stop) of dimension `dim` of tensor `name` into the head of `dest`."""
    dim, start, stop = region
    part = f.get_slice(name)
    shape = tuple(part.get_shape())
    want = list(dest.shape)
    want[dim] = shape[dim] if dim < len(shape) else -1
    if (
        len(shape) != dest.dim()
        or tuple(want) != shape
        or not 0 <= start <= stop <= shape[dim]
        or stop - start > dest.shape[dim]
    ):
        raise ValueError(
            f"tensor {name!r}: checkpoint shape {shape} cannot give rows [{start}, {stop}) of "
            f"dimension {dim} for the model's shard {tuple(dest.shape)} (check config.json)"
        )
    index = (slice(None),) * dim + (slice(start, stop),)
    tensor = part[index]
    with torch.no_grad():
        dest.narrow(dim, 0, stop - start).copy_(tensor)
        dest.narrow(dim, stop - start, dest.shape[dim] - (stop - start)).zero_()
