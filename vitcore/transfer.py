"""Device results → pinned host memory on a copy stream of their own (CUDA).

On one stream, the copy of batch i's tokens (base, batch 256, all tokens as fp16: 134 MB) would
wait for the kernels of batch i+1 that the main thread queued after it, and the GPU would then
sit idle while the copy runs. On a second stream the copy runs beside batch i+1's compute:

    compute stream   [ batch i ][ batch i+1 ][ batch i+2 ] …
    copy stream                [ copy i ]   [ copy i+1 ]
    writer thread                      waits for copy i → HDF5

The host buffers are pinned (page-locked): only those can be copied to asynchronously, and at
the bus's full rate. The writer thread waits on the copy's event before it reads them. Rows with
inf/NaN are counted on the device as part of the same work, so the writer has nothing to scan.
"""

from __future__ import annotations

import dataclasses

import torch

from vitcore.store import Rows


class HostCopier:
    """Rows holding device tensors → Rows holding pinned host tensors, a count and a ready event."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def __call__(self, rows: Rows) -> Rows:
        if not torch.is_tensor(rows.tokens):  # every image of the batch failed: nothing on the device
            return rows
        flat = rows.tokens.reshape(len(rows.tokens), -1)
        nonfinite = (~torch.isfinite(flat)).any(dim=1).sum()  # a 0-d tensor, still on the device
        # The copy stream starts once the compute stream has produced this batch.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            tokens, count = self._to_host(rows.tokens), self._to_host(nonfinite)
            mean = None if rows.mean is None else self._to_host(rows.mean)
            layers = {k: self._to_host(v) for k, v in rows.layers.items()}
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return dataclasses.replace(rows, tokens=tokens, mean=mean, layers=layers, nonfinite=count, ready=ready)

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        # The caching allocator must not hand this device memory to the compute stream's next
        # batch before the copy stream has read it; the main thread drops its reference now.
        tensor.record_stream(self.stream)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)
