"""Micro-batches onto the device: pinned host memory and a copy stream on CUDA, nothing on CPU.

On CUDA, ``DeviceInputs(device)(micro_batches)`` pins each (x, y) pair and issues every copy of the
step at once, non-blocking, on a side stream; the compute stream waits for a pair's copy only when the
pair is used. The copies therefore overlap with the previous micro-batch's compute and, since a quiet
step makes no host read and the host runs ahead of the GPU, with the tail of the previous step.
``x.to(device, non_blocking=True)`` from pageable memory (what train.py did) is a synchronous copy
through a staging buffer. The sampler is not read ahead, so its checkpointed position stays exact.

On CPU the batches are already where the model is: they are returned as they are (no copy, no thread).
Untested on a GPU so far (no GPU was lent to this task; tools/gpu_check.sh covers it).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch


class DeviceInputs:
    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.stream is None:
            return iter(micro_batches)
        return self._copied(micro_batches)

    def _copied(self, micro_batches):
        copies = []
        with torch.cuda.stream(self.stream):
            for x, y in micro_batches:
                x = x.pin_memory().to(self.device, non_blocking=True)
                y = y.pin_memory().to(self.device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.stream)
                copies.append((x, y, done))
        compute = torch.cuda.current_stream(self.device)
        for x, y, done in copies:
            compute.wait_event(done)
            x.record_stream(compute)  # allocated on the copy stream, used (and freed) on the compute stream
            y.record_stream(compute)
            yield x, y
