"""Device results → pinned host memory on a copy stream of their own (CUDA).

On one stream, the copy of batch i's tokens (base, batch 256, all tokens as fp16: 134 MB) would
wait for the kernels of batch i+1 that the main thread queued after it, and the GPU would then
sit idle while the copy runs. On a second stream the copy runs beside batch i+1's compute:

    compute stream   [ batch i ][ batch i+1 ][ batch i+2 ] …
    copy stream                [ copy i ]   [ copy i+1 ]
    writer thread                      waits for copy i → HDF5 → gives the buffers back

The host buffers are pinned (page-locked): only those can be copied to asynchronously, and at
the bus's full rate. They are allocated once per batch in flight and reused: the writer thread
hands each set back when it has written it (pinned memory is slow to allocate, and PyTorch's
pinned-memory cache rounds every size up to a power of two and holds freed blocks until
later copies finish). Rows with inf/NaN are counted on the device, so the writer has nothing
to scan.
"""

from __future__ import annotations

import dataclasses
import queue

import torch

from vitcore.store import Rows


class HostCopier:
    """Rows holding device tensors → Rows holding pinned host tensors, a count and a ready event."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._spare: queue.SimpleQueue = queue.SimpleQueue()  # buffer sets the writer has finished with
        self._headroom = 1  # rows allocated per row needed: 2 once batches have outgrown a set

    def __call__(self, rows: Rows) -> Rows:
        arrays = {name: value for name, value in rows.arrays.items() if torch.is_tensor(value)}
        if not arrays:  # every image of the batch failed: nothing on the device
            return rows
        if torch.is_tensor(rows.nonfinite):
            arrays["nonfinite"] = rows.nonfinite  # a 0-d count made on the device
        buffers = self._buffers(arrays)
        # The copy stream starts once the compute stream has produced this batch.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        host = {}
        with torch.cuda.stream(self.stream):
            for name, tensor in arrays.items():
                # The caching allocator must not hand this device memory to the compute stream's
                # next batch before the copy stream has read it; the main thread drops it now.
                tensor.record_stream(self.stream)
                target = buffers[name][: len(tensor)] if tensor.dim() else buffers[name]
                host[name] = target.copy_(tensor, non_blocking=True)
            ready = torch.cuda.Event(blocking=True)  # the writer sleeps on it rather than spinning
            ready.record(self.stream)
        nonfinite = host.pop("nonfinite", rows.nonfinite)
        return dataclasses.replace(
            rows, arrays={**rows.arrays, **host}, nonfinite=nonfinite,
            ready=ready, release=lambda: self._spare.put(buffers),
        )

    def _buffers(self, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pinned buffers that hold ``arrays``: a set the writer gave back, or a new one.

        A new set is made exactly to size; once a spare set has been too small (native-resolution
        batches hold a different number of tokens each time), new sets get twice the rows needed,
        so a few sets soon fit every batch instead of one being allocated per batch.
        """
        outgrown = False
        while True:
            try:
                spare = self._spare.get_nowait()
            except queue.Empty:
                break
            if all(_fits(spare.get(name), tensor) for name, tensor in arrays.items()):
                return spare
            outgrown = True  # a set made for smaller batches is let go
        self._headroom = 2 if outgrown or self._headroom > 1 else 1
        return {name: torch.empty((t.shape[0] * self._headroom, *t.shape[1:]) if t.dim() else t.shape,
                                  dtype=t.dtype, pin_memory=True) for name, t in arrays.items()}


def _fits(buffer: torch.Tensor | None, tensor: torch.Tensor) -> bool:
    if buffer is None or buffer.dtype != tensor.dtype or buffer.dim() != tensor.dim():
        return False
    if not tensor.dim():
        return True
    return buffer.shape[1:] == tensor.shape[1:] and buffer.shape[0] >= tensor.shape[0]
