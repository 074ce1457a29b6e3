"""The slow tier: experts read from the model's safetensors file(s), one expert at a time.

Two readers of the same bytes. `reader="pread"` (default) reads each tensor's byte range (offsets
from the safetensors header) with one `os.pread` on a kept-open descriptor. `reader="safe_open"` uses
safetensors' `safe_open(...).get_slice`, opened per read so no mapping pins the pages; it costs ~2.7
ms per tensor here (open + map), which would dominate every miss, hence not the default. With
`drop_page_cache`, each tensor's range is dropped from the OS page cache (`posix_fadvise(DONTNEED)`)
right after it is read, so every disk-tier read goes to the device, not the page cache.

With `inter` (a tensor-parallel rank's [start, stop) of the intermediate width), each read is that
rank's slice only: rows of gate and up, columns of down, through `get_slice` (columns of down are
not one byte range), so no rank ever reads a whole expert.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from batonserve.workers.expert_store.types import ExpertKey, ExpertWeights
from batonserve.workers.models.config import DTYPES, ModelConfig
from batonserve.workers.models.loader import checkpoint_files

_DTYPES = {name: getattr(torch, name) for name in DTYPES}
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
READERS = ("pread", "safe_open")


# Per architecture: (MoE block prefix in a layer, gate, up, down projection names of an expert).
EXPERT_NAMES = {
    "MixtralForCausalLM": ("block_sparse_moe", "w1", "w3", "w2"),
    "Qwen2MoeForCausalLM": ("mlp", "gate_proj", "up_proj", "down_proj"),
}


def expert_tensor_names(
    key: ExpertKey, architecture: str = "MixtralForCausalLM"
) -> tuple[str, str, str]:
    """Checkpoint names of (gate, up, down) of one expert of `architecture`."""
    if architecture not in EXPERT_NAMES:
        raise ValueError(
            f"architectures: {architecture!r} has no expert layout; supported: {list(EXPERT_NAMES)}"
        )
    block, gate, up, down = EXPERT_NAMES[architecture]
    p = f"model.layers.{key.layer}.{block}.experts.{key.expert}."
    return p + gate + ".weight", p + up + ".weight", p + down + ".weight"


@dataclass(frozen=True)
class TensorLoc:
    """Where one tensor's bytes are in a safetensors file."""

    start: int  # absolute byte offset
    end: int
    dtype: str  # safetensors dtype code, e.g. "F16"
    shape: tuple[int, ...]


def _tensor_locs(path: Path) -> dict[str, TensorLoc]:
    """Every tensor of a safetensors file (8-byte little-endian header length, then JSON header)."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    return {
        name: TensorLoc(
            base + int(meta["data_offsets"][0]),
            base + int(meta["data_offsets"][1]),
            str(meta["dtype"]),
            tuple(int(d) for d in meta["shape"]),
        )
        for name, meta in header.items()
        if name != "__metadata__"
    }


def _into(weights: ExpertWeights, out: ExpertWeights | None) -> ExpertWeights:
    """`weights` copied into `out`'s tensors when given (the slower readers' path), else as is."""
    if out is None:
        return weights
    out.w_gate_up.copy_(weights.w_gate_up)
    out.w_down.copy_(weights.w_down)
    return out


class DiskTier:
    """Reads one expert's weights from the checkpoint; counts bytes and can keep reads cold."""

    def __init__(
        self,
        model_dir: Path,
        dtype: str,
        drop_page_cache: bool = False,
        reader: str = "pread",
        inter: tuple[int, int] | None = None,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: must be one of {list(_DTYPES)}, got {dtype!r}")
        if reader not in READERS:
            raise ValueError(f"reader: must be one of {list(READERS)}, got {reader!r}")
        self.files = checkpoint_files(Path(model_dir))
        self.architecture = ModelConfig.from_dir(Path(model_dir)).architecture
        self.dtype = _DTYPES[dtype]
        self.drop_page_cache = drop_page_cache
        self.reader = reader
        self.inter = inter  # this TP rank's slice of the intermediate width; None = whole experts
        self._locs: dict[str, TensorLoc] = {}
        self._fds: dict[Path, int] = {}
        for path in sorted(set(self.files.values())):
            self._locs.update(_tensor_locs(path))
            self._fds[path] = os.open(path, os.O_RDONLY)
        self._lock = threading.Lock()
        self._local = threading.local()  # per-thread read buffer (demand and prefetch threads)
        self.bytes_read = 0
        self.reads = 0

    def has(self, key: ExpertKey) -> bool:
        """Whether the checkpoint holds this expert."""
        return all(name in self.files for name in expert_tensor_names(key, self.architecture))

    def read(self, key: ExpertKey, out: ExpertWeights | None = None) -> ExpertWeights:
        """Load one expert from disk: (w1|w3 stacked [2I, D], w2 [D, I]) in the store's dtype;
        into `out`'s tensors (a slot of the store's slab) when given, else new ones."""
        names = expert_tensor_names(key, self.architecture)
        missing = [n for n in names if n not in self.files]
        if missing:
            raise KeyError(f"expert {tuple(key)}: checkpoint has no tensor {missing[0]!r}")
        if self.inter is not None:
            return _into(self._read_slice(names), out)
        locs = [self._locs[n] for n in names]
        paths = {self.files[n] for n in names}
        nbytes = sum(loc.end - loc.start for loc in locs)
        span = (min(loc.start for loc in locs), max(loc.end for loc in locs))
        if self.reader == "pread" and len(paths) == 1 and span[1] - span[0] == nbytes:
            # the expert's three tensors are adjacent (safetensors sorts names): one read, one drop
            path = paths.pop()
            whole = self._pread_reused(path, span[0], span[1])
            w1, w3, w2 = (self._view(path, whole, loc, span[0]) for loc in locs)
            if self.drop_page_cache:
                os.posix_fadvise(self._fds[path], span[0], nbytes, os.POSIX_FADV_DONTNEED)
            with self._lock:
                self.bytes_read += nbytes
                self.reads += 1
            # Straight from the reused read buffer into the expert's tensors (dtype converted on
            # the copy): with `out`, no allocation at all; else one, of the expert's size.
            if out is None:
                gu = torch.empty((w1.shape[0] + w3.shape[0], w1.shape[1]), dtype=self.dtype)
                down = torch.empty(w2.shape, dtype=self.dtype)
            else:
                gu, down = out.w_gate_up, out.w_down
            gu[: w1.shape[0]].copy_(w1)
            gu[w1.shape[0] :].copy_(w3)
            return ExpertWeights(gu, down.copy_(w2))
        else:
            parts = []
            for name, loc in zip(names, locs, strict=True):
                path = self.files[name]
                if self.reader == "pread":
                    raw = self._pread(path, loc.start, loc.end)
                    parts.append(self._view(path, raw, loc, loc.start).to(self.dtype))
                else:
                    with safe_open(str(path), framework="pt") as f:
                        parts.append(f.get_slice(name)[:].to(self.dtype))
                if self.drop_page_cache:
                    os.posix_fadvise(
                        self._fds[path], loc.start, loc.end - loc.start, os.POSIX_FADV_DONTNEED
                    )
        with self._lock:
            self.bytes_read += nbytes
            self.reads += 1
        w1, w3, w2 = parts
        # cat and clone copy out of the read buffer, so it is freed (budgets count these bytes)
        return _into(
            ExpertWeights(
                torch.cat([w1, w3], dim=0), w2.clone(memory_format=torch.contiguous_format)
            ),
            out,
        )

    def _read_slice(self, names: tuple[str, str, str]) -> ExpertWeights:
        """Rows [i0, i1) of gate and up, columns [i0, i1) of down: one rank's share."""
        assert self.inter is not None
        i0, i1 = self.inter
        parts = []
        nbytes = 0
        for name, cols in zip(names, (False, False, True), strict=True):
            path = self.files[name]
            with safe_open(str(path), framework="pt") as f:
                part = f.get_slice(name)
                n = part.get_shape()[1 if cols else 0]
                if not 0 <= i0 < i1 <= n:
                    raise ValueError(
                        f"tensor {name!r}: intermediate width {n} has no slice [{i0}, {i1})"
                    )
                raw = part[:, i0:i1] if cols else part[i0:i1]
            nbytes += raw.numel() * raw.element_size()
            parts.append(raw.to(self.dtype))
            if self.drop_page_cache:
                loc = self._locs[name]
                os.posix_fadvise(
                    self._fds[path], loc.start, loc.end - loc.start, os.POSIX_FADV_DONTNEED
                )
        with self._lock:
            self.bytes_read += nbytes
            self.reads += 1
        w1, w3, w2 = parts
        return ExpertWeights(
            torch.cat([w1, w3], dim=0), w2.clone(memory_format=torch.contiguous_format)
        )

    def _pread_reused(self, path: Path, start: int, end: int) -> bytearray:
        """Bytes [start, end) of a checkpoint file in this thread's read buffer (valid until the
        thread's next read; the buffer only grows)."""
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < end - start:
            buf = self._local.buf = bytearray(end - start)
        n = os.preadv(self._fds[path], [memoryview(buf)[: end - start]], start)
        if n != end - start:
            raise ValueError(f"checkpoint {str(path)!r}: short read (file truncated?)")
        return buf

    def _pread(self, path: Path, start: int, end: int) -> bytearray:
        """Bytes [start, end) of a checkpoint file."""
        raw = bytearray(os.pread(self._fds[path], end - start, start))
        if len(raw) != end - start:
            raise ValueError(f"checkpoint {str(path)!r}: short read (file truncated?)")
        return raw

    @staticmethod
    def _view(path: Path, raw: bytearray, loc: TensorLoc, base: int) -> torch.Tensor:
        """The tensor at `loc` inside `raw`, which holds the file from offset `base`."""
        if loc.dtype not in _ST_DTYPES:
            raise ValueError(f"checkpoint {str(path)!r}: unsupported expert dtype {loc.dtype!r}")
        flat = torch.frombuffer(raw, dtype=torch.uint8)[loc.start - base : loc.end - base]
        return flat.view(_ST_DTYPES[loc.dtype]).view(loc.shape)

    def drop_all(self) -> None:
        """Drop every checkpoint file from the page cache (before a measured run)."""
        for fd in self._fds.values():
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        """Close the file descriptors."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
