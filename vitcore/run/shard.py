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
    """The inputs of shard ``index`` of ``count`` and the record its file keeps. Folders and
    containers that could not be listed are recorded once, by shard 0."""
    total = len(found.sources)
    start, stop = index * total // count, (index + 1) * total // count
    record = ShardRecord(index, count, start, stop, total, inputs_hash(found))
    return dataclasses.replace(found, sources=found.sources[start:stop],
                               unlisted=found.unlisted if index == 0 else []), record
