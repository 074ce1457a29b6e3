"""The CUDA-specific part of the store: pinned host staging and one copy stream (GPU tier only).

Everything CUDA lives here so the rest of the store runs unchanged on CPU. Uploads run on their own
stream so they overlap the compute stream; a demand upload makes the compute stream wait on the copy
(no host sync); a prefetch upload (background thread) waits on the host for its own copy.
"""

from __future__ import annotations

import threading

import torch

from batonserve.workers.expert_store.types import ExpertWeights


class CudaUploader:
    """Host -> GPU copies of expert weights through pinned buffers on a dedicated stream."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"device: CudaUploader needs an available CUDA device, got {device}")
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._lock = threading.Lock()  # one copy stream: serialize enqueues from two threads

    @staticmethod
    def pin(weights: ExpertWeights) -> ExpertWeights:
        """Page-locked copies (async H2D copies need pinned sources)."""
        return ExpertWeights(weights.w_gate_up.pin_memory(), weights.w_down.pin_memory())

    def upload(self, host: ExpertWeights, blocking: bool) -> ExpertWeights:
        """Copy pinned `host` weights to the GPU on the copy stream; order them before later use."""
        with self._lock, torch.cuda.stream(self.stream):
            gu = host.w_gate_up.to(self.device, non_blocking=True)
            down = host.w_down.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        if blocking:
            done.synchronize()  # background prefetch: the entry is complete once inserted
        else:
            torch.cuda.current_stream(self.device).wait_event(done)
        # The tensors were allocated on the copy stream but are freed later from the compute one.
        gu.record_stream(torch.cuda.current_stream(self.device))
        down.record_stream(torch.cuda.current_stream(self.device))
        return ExpertWeights(gu, down)
