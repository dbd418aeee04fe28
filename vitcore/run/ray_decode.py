"""--engine ray: decoding and preprocessing as Ray CPU tasks, apart from the actors that hold the
encoder (Ray Data's batch-inference shape: CPU tasks feed a pool of GPU actors).

An actor running a unit asks for its batches here instead of from a DataLoader: each batch is one
task (``decode_range``: the family's worker side over a range of the unit's inputs, collated as the
DataLoader collates), ``in_flight`` of them submitted ahead, taken in order. The tasks go wherever
the cluster has a free CPU, so decoding scales with the cluster's CPUs, not with its GPUs. A task
whose worker or node dies is tried again by Ray (decoding has no side effects); an input that
cannot be decoded is a failure record inside the batch, as in a local run.

Ray is imported only in an actor of a Ray run.
"""

from __future__ import annotations

import collections
import dataclasses

from vitcore.imaging.loader import Batch, ImageDataset, collate


def decode_range(dataset: ImageDataset, start: int, stop: int) -> Batch:
    """In a Ray task: inputs start..stop-1 of a unit → one batch (indices into the unit's list)."""
    return collate([dataset[index] for index in range(start, stop)])


@dataclasses.dataclass
class RayBatches:
    """A batch source for pipeline.extract (``make_batches``): the unit's batches from Ray tasks.

    ``task_cpus``: the CPUs each decoding task asks Ray for (less than one where the encoder actors
    leave less than a CPU each, so that decoding can always be scheduled)."""

    task_cpus: float = 1.0

    def __call__(self, sources: list, image_loader, batch_size: int, workers: int, pin_memory: bool, meta=(),
                 max_image_pixels: int | None = None):
        return self._batches(ImageDataset(sources, image_loader, meta, max_image_pixels), batch_size, max(1, workers),
                             pin_memory)

    def _batches(self, dataset: ImageDataset, batch_size: int, in_flight: int, pin_memory: bool):
        import ray

        decode = ray.remote(num_cpus=self.task_cpus, max_retries=3, retry_exceptions=False)(decode_range)
        shared = ray.put(dataset)  # the unit's input list once, not once per task
        starts = iter(range(0, len(dataset), batch_size))
        pending: collections.deque = collections.deque()
        try:
            for start in starts:
                pending.append(decode.remote(shared, start, min(start + batch_size, len(dataset))))
                if len(pending) >= in_flight:
                    yield _taken(ray, pending.popleft(), pin_memory)
            while pending:
                yield _taken(ray, pending.popleft(), pin_memory)
        finally:  # a stopped or failed unit: the batches not taken are not wanted
            for ref in pending:
                ray.cancel(ref, force=True)


def _taken(ray, ref, pin_memory: bool) -> Batch:
    batch = ray.get(ref)
    return batch.pin_memory() if pin_memory else batch
