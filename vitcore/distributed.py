"""Runs under torchrun: one shard per rank, then rank 0 merges them into the one output.

Each rank takes shard RANK of WORLD_SIZE of the sorted inputs, on its own GPU (cuda:LOCAL_RANK)
or the CPU, and writes OUT.shardRRRRR-of-WWWWW.h5 next to OUT. The ranks then exchange how
they ended (torch.distributed, NCCL on GPUs, gloo on CPUs): if any failed, every rank fails
and nothing is merged; a rerun of the same command resumes each unfinished shard.
"""

from __future__ import annotations

import dataclasses
import os

from vitcore.errors import VitExtractError


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@dataclasses.dataclass
class DistributedResult:
    rank: int
    world_size: int
    shard: object  # this rank's ExtractResult
    merged: object | None  # MergeResult on rank 0


def extract_distributed(paths, output: str, options, progress=False) -> DistributedResult:
    import torch
    import torch.distributed as dist

    from vitcore.merge import merge
    from vitcore.pipeline import extract
    from vitcore.shard import shard_path
    from vitcore.store import check_output

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = options.device in ("auto", "cuda") and torch.cuda.is_available()
    device = f"cuda:{local_rank}" if wants_cuda else options.device
    if wants_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if wants_cuda else "gloo")
    try:
        error, result = None, None
        try:
            check_output(output, options.resume, options.overwrite)  # every rank refuses alike
            result = extract(paths, shard_path(output, rank, world), options, shard=(rank, world),
                             device=device, progress=progress if rank == 0 else False)
        except VitExtractError as err:
            error = f"rank {rank}: {err}"
        outcomes: list = [None] * world
        dist.all_gather_object(outcomes, error)
        failed = [e for e in outcomes if e]
        if failed:
            raise VitExtractError(
                f"{len(failed)} of {world} ranks failed, so {output} was not written ("
                + "; ".join(failed[:3]) + "); finished shards are kept: rerun the same command to finish"
            )
        merged = None
        if rank == 0:
            shards = [shard_path(output, r, world) for r in range(world)]
            merged = merge(output, shards, overwrite=options.overwrite or options.resume)
        dist.barrier()
        return DistributedResult(rank, world, result, merged)
    finally:
        dist.destroy_process_group()
