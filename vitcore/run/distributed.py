"""Runs under torchrun: one shard per rank, then rank 0 merges them into the one output.

Each rank takes shard RANK of WORLD_SIZE of the sorted inputs, on its own GPU (cuda:LOCAL_RANK)
or the CPU, and writes OUT.shardRRRRR-of-WWWWW.h5 next to OUT. The ranks then exchange how
they ended (torch.distributed, NCCL on GPUs, gloo on CPUs): if any failed, every rank fails
and nothing is merged; a rerun of the same command resumes each unfinished shard. Rank 0
returns one summary for the whole launch, shaped like a single run's.
"""

from __future__ import annotations

import dataclasses
import os

from vitcore.errors import VitExtractError
from vitcore.run.launch import launched_by_torchrun, rank
from vitcore.run.notes import counted_notes
from vitcore.run.shard import shard_path
from vitcore.store import check_output, devices_joined
from vitcore.store.merge import merge

__all__ = ["DistributedResult", "LaunchFailed", "extract_distributed", "launched_by_torchrun", "rank"]


@dataclasses.dataclass
class DistributedResult:
    rank: int
    world_size: int
    summary: object | None  # rank 0: an ExtractResult for the whole launch (output = the merged file)
    merged: object | None  # rank 0: the MergeResult


class LaunchFailed(VitExtractError):
    """One or more ranks failed; nothing was merged."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def extract_distributed(paths, output: str, options, progress=False) -> DistributedResult:
    import torch  # torch: only in a launched rank (the CLI asks launched_by_torchrun() without it)
    import torch.distributed as dist

    from vitcore.run.pipeline import extract

    this, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = options.device in ("auto", "cuda") and torch.cuda.is_available()
    device = f"cuda:{local_rank}" if wants_cuda else options.device
    if wants_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if wants_cuda else "gloo")
    try:
        outcome: tuple = (None, 0, None)  # (error, exit code, ExtractResult)
        try:
            check_output(output, options.resume, options.overwrite)  # every rank refuses alike
            result = extract(paths, shard_path(output, this, world), options, shard=(this, world),
                             device=device, progress=progress if this == 0 else False)
            outcome = (None, 0, result)
        except VitExtractError as err:
            outcome = (str(err), err.exit_code, None)
        outcomes: list = [None] * world
        dist.all_gather_object(outcomes, outcome)
        failed = [(r, e, code) for r, (e, code, _) in enumerate(outcomes) if e]
        if failed:
            raise _launch_failure(failed, world, output)
        summary = merged = None
        try:
            if this == 0:
                shards = [shard_path(output, r, world) for r in range(world)]
                merged = merge(output, shards, overwrite=options.overwrite or options.resume)
                summary = _combined([result for _, _, result in outcomes], merged)
        finally:
            dist.barrier()  # also when the merge fails: the other ranks must not wait for a timeout
        return DistributedResult(this, world, summary, merged)
    finally:
        dist.destroy_process_group()


def _launch_failure(failed: list[tuple[int, str, int]], world: int, output: str) -> LaunchFailed:
    messages = {message for _, message, _ in failed}
    codes = {code for _, _, code in failed}
    if len(messages) == 1:  # every rank said the same (a usage problem): say it once
        text = messages.pop()
    else:
        text = "; ".join(f"rank {r}: {m}" for r, m, _ in failed[:3]) + (" …" if len(failed) > 3 else "")
    text = f"{len(failed)} of {world} ranks failed, so {output} was not written: {text}"
    if codes <= {130, 143}:  # stopped by a signal: the shards resume
        return LaunchFailed(text + " (finished shards are kept; rerun the same command to continue)", codes.pop())
    return LaunchFailed(text, 2 if codes == {2} else 1)


def _combined(results: list, merged):
    """One ExtractResult for the launch: the ranks' counts added up, the merged file as output."""
    first = results[0]
    missing: dict[str, int] = {}
    nonfinite: dict[str, int] = {}
    for r in results:
        for name, count in r.missing_meta.items():
            missing[name] = missing.get(name, 0) + count
        for name, count in r.nonfinite_meta.items():
            nonfinite[name] = nonfinite.get(name, 0) + count
    per_rank = {note for r in results for note in counted_notes(r.missing_meta, {}, None, r.nonfinite_meta)}
    seconds = max(r.seconds for r in results)
    written = sum(r.written for r in results)
    return dataclasses.replace(
        first,
        output=merged.output,
        found=sum(r.found for r in results),
        skipped=sum(r.skipped for r in results),
        written=written,
        clips=sum(r.clips for r in results),
        rows=merged.rows,
        failures=[f for r in results for f in r.failures],
        seconds=seconds,
        images_per_second=written / seconds if seconds > 0 else 0.0,
        device=devices_joined(*(r.device for r in results)),
        timings={},
        # The ranks' own counts are one note each; the launch's is their sum, said once.
        warnings=[w for w in dict.fromkeys(w for r in results for w in r.warnings) if w not in per_rank]
        + counted_notes(missing, {}, None, nonfinite),
        missing_meta=missing,
        nonfinite_meta=nonfinite,
    )
