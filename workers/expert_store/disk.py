"""The slow tier: experts read from the model's safetensors file(s), one expert at a time.

Reads go through safetensors' `safe_open(...).get_slice`, opened per read so no mapping keeps the
pages alive. With `drop_page_cache`, the byte range of every tensor read is dropped from the OS page
cache (`posix_fadvise(DONTNEED)`) right after the read, so the next read of that expert goes to the
device again: disk-tier timings then measure the device, not the page cache.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import torch
from safetensors import safe_open

from batonserve.workers.expert_store.types import ExpertKey, ExpertWeights
from batonserve.workers.models.loader import checkpoint_files

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def expert_tensor_names(key: ExpertKey) -> tuple[str, str, str]:
    """Mixtral checkpoint names of (w1 gate, w3 up, w2 down) of one expert."""
    p = f"model.layers.{key.layer}.block_sparse_moe.experts.{key.expert}."
    return p + "w1.weight", p + "w3.weight", p + "w2.weight"


def _tensor_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte range [start, end) of every tensor in a safetensors file (its JSON header)."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    return {
        name: (base + int(meta["data_offsets"][0]), base + int(meta["data_offsets"][1]))
        for name, meta in header.items()
        if name != "__metadata__"
    }


class DiskTier:
    """Reads one expert's weights from the checkpoint; counts bytes and can keep reads cold."""

    def __init__(self, model_dir: Path, dtype: str, drop_page_cache: bool = False) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: must be one of {list(_DTYPES)}, got {dtype!r}")
        self.files = checkpoint_files(Path(model_dir))
        self.dtype = _DTYPES[dtype]
        self.drop_page_cache = drop_page_cache
        self._ranges: dict[str, tuple[int, int]] = {}
        for path in sorted(set(self.files.values())):
            self._ranges.update(_tensor_ranges(path))
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.reads = 0

    def has(self, key: ExpertKey) -> bool:
        """Whether the checkpoint holds this expert."""
        return all(name in self.files for name in expert_tensor_names(key))

    def read(self, key: ExpertKey) -> ExpertWeights:
        """Load one expert from disk: (w1|w3 stacked [2I, D], w2 [D, I]) in the store's dtype."""
        names = expert_tensor_names(key)
        missing = [n for n in names if n not in self.files]
        if missing:
            raise KeyError(f"expert {tuple(key)}: checkpoint has no tensor {missing[0]!r}")
        parts: list[torch.Tensor] = []
        nbytes = 0
        for name in names:
            path = self.files[name]
            with safe_open(str(path), framework="pt") as f:
                parts.append(f.get_slice(name)[:].to(self.dtype))
            start, end = self._ranges[name]
            nbytes += end - start
            if self.drop_page_cache:
                self._drop(path, start, end - start)
        with self._lock:
            self.bytes_read += nbytes
            self.reads += 1
        w1, w3, w2 = parts
        return ExpertWeights(torch.cat([w1, w3], dim=0).contiguous(), w2.contiguous())

    def drop_all(self) -> None:
        """Drop every checkpoint file from the page cache (before a measured run)."""
        for path in sorted(set(self.files.values())):
            self._drop(path, 0, 0)

    @staticmethod
    def _drop(path: Path, offset: int, length: int) -> None:
        """posix_fadvise(DONTNEED) on a file range (0 length = to the end)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
