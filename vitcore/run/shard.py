"""Splitting one run into N shards: contiguous, count-balanced ranges of the sorted input list.

Shard I of N takes inputs [I·T/N, (I+1)·T/N) of the T inputs found, in the order discovery
sorts them, so concatenating the shards in order gives the single-run order. Each shard file
records its range and a hash of the whole input list, which merge and resume check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

from vitcore.errors import UsageError
from vitcore.inputs.base import Discovery


@dataclasses.dataclass(frozen=True)
class ShardRecord:
    index: int
    count: int
    start: int  # first input of this shard in the full sorted list
    stop: int  # one past the last
    total: int  # inputs in the full list
    inputs_sha256: str  # hash of the full list (roots and keys, in order)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def parse_shard(text: str) -> tuple[int, int]:
    """``"3/8"`` → (3, 8); shards are numbered 0 … N−1."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match:
        raise UsageError(f"--shard {text!r}: write it as I/N, e.g. 0/8 (shards are numbered 0 to N-1)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise UsageError(f"--shard {text}: N must be at least 1")
    if index >= count:
        raise UsageError(f"--shard {text}: the shard number (before the slash) must be 0 to {max(count - 1, 0)} for {count} shards")
    return index, count


def shard_path(output: str, index: int, count: int) -> str:
    """Where shard I of N of ``output`` is written: next to it, ``out.shard00003-of-00008.h5``."""
    stem, ext = os.path.splitext(output)
    return f"{stem}.shard{index:05d}-of-{count:05d}{ext or '.h5'}"


def inputs_hash(found: Discovery) -> str:
    digest = hashlib.sha256()
    for source in found.sources:
        digest.update(os.fsencode(found.roots[source.root_index]) + b"\0" + source.key.encode("utf-8") + b"\n")
    return digest.hexdigest()


def take_shard(found: Discovery, index: int, count: int) -> tuple[Discovery, ShardRecord]:
    """The inputs of shard ``index`` of ``count`` and the record its file keeps."""
    total = len(found.sources)
    return take_range(found, index, count, index * total // count, (index + 1) * total // count)


def take_range(found: Discovery, index: int, count: int, start: int, stop: int) -> tuple[Discovery, ShardRecord]:
    """Inputs [start, stop) as part ``index`` of ``count`` and the record its file keeps. Folders and
    containers that could not be listed are recorded once, by part 0."""
    record = ShardRecord(index, count, start, stop, len(found.sources), inputs_hash(found))
    return dataclasses.replace(found, sources=found.sources[start:stop],
                               unlisted=found.unlisted if index == 0 else []), record


def unit_ranges(found: Discovery, size: int) -> list[tuple[int, int]]:
    """The sorted inputs cut into units of at most ``size`` (--engine ray), at container boundaries:
    a tar file's members, or a Parquet row group's rows, stay in one unit when they fit in one, so
    each is read by one worker, front to back. A container larger than ``size`` is cut into
    count-balanced pieces; files on their own fill units evenly (as many units as ``size`` needs,
    the inputs shared out among them: no small last unit leaves an actor idle while another works)."""
    groups: list[int] = []  # lengths of runs of inputs that belong together, in order
    previous = object()
    for source in found.sources:
        together = _container_of(source)
        if together is not None and together == previous:
            groups[-1] += 1
        else:
            groups.append(1)
        previous = together
    total = len(found.sources)
    target = -(-total // max(1, -(-total // size)))  # units filled evenly: 1,152 at 1,024 → two of 576
    ranges: list[tuple[int, int]] = []
    start = stop = 0
    for length in groups:
        if stop - start + length > target and stop > start:  # this group would not fit: the unit ends before it
            ranges.append((start, stop))
            start = stop
        if length > target:  # a container larger than a unit's fill: a unit of its own, in pieces if over size
            pieces = -(-length // size)
            ranges += [(stop + i * length // pieces, stop + (i + 1) * length // pieces) for i in range(pieces)]
            start = stop = stop + length
            continue
        stop += length
    if stop > start:
        ranges.append((start, stop))
    return ranges or [(0, 0)]


def _container_of(source):
    """What an input is read from together with its neighbours: (tar file) or (Parquet file, row
    group); None for a file of its own."""
    if hasattr(source, "member") and hasattr(source, "offset"):
        return ("tar", source.path)
    if hasattr(source, "row_group"):
        return ("parquet", source.path, source.row_group)
    return None
