"""Combining shard files into one output with the single-run schema.

By default everything is copied into one self-contained file, read in blocks (memory stays near
one block whatever the shards hold). ``virtual=True`` makes the large arrays (tokens, mean,
layers/K) HDF5 virtual datasets over the shards instead, named by paths relative to the merged
file: no copy, but every read needs the shards beside it and one open file per shard, and plain
h5py reads a shard it cannot open as NaN, silently (vit-extract's readers refuse such a read).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import h5py
import numpy as np

from vitcore.errors import UsageError, VitExtractError
from vitcore.inputs.base import identity_of
from vitcore.store.output import check_output
from vitcore.store.reader import StoredTokens, allow_open_files
from vitcore.store.schema import (
    ATTRIBUTES,
    absent_mask,
    BY_NAME,
    RAGGED_CHUNK_ROWS,
    SCHEMA_VERSION,
    STRING,
    array_names,
    chunks,
    compared,
    devices_joined,
    ragged_index_names,
    stored_value,
)
from vitcore.store.writer import BUILDING_SUFFIX

COPY_BLOCK = 256  # rows per read/write when copying tokens
TEXT_BLOCK = 65536  # strings per read/write (paths, errors, meta/<name>)


@dataclass
class MergeResult:
    output: str
    rows: int
    failed: int
    shards: int
    virtual: bool


@dataclass
class _Shard:
    path: str
    rows: int
    failed: int
    record: dict  # the ShardRecord
    settings: dict  # decoded attributes
    attrs: dict  # raw attributes (what resume and merge compare)


def _read_shard(path: str) -> _Shard:
    with StoredTokens(path) as f:
        settings = f.settings
        record = settings.get("shard")
        if not record:
            raise UsageError(f"{path} is not a shard (it was not made with --shard or torchrun)")
        if not settings.get("complete"):
            handled = len(f) + len(f.failures)
            raise UsageError(f"{path} is unfinished ({handled} of {record['stop'] - record['start']} inputs handled); "
                             "rerun its launch (it resumes) before merging")
        return _Shard(path, len(f), len(f.failures), record, settings, dict(f.h5.attrs))


def _check_compatible(shards: list[_Shard]) -> None:
    """Same encoder, weights, preprocessing, … and input list; ranges that tile it exactly once."""
    first = shards[0]
    for attribute in compared():
        if attribute.name == "shard":  # differs by design
            continue
        for shard in shards[1:]:
            if attribute.differs(stored_value(first.attrs, attribute), stored_value(shard.attrs, attribute)):
                raise UsageError(f"cannot merge: {shard.path} has a different {attribute.compare} from {first.path}")
    for shard in shards[1:]:
        for key, words in (("inputs_sha256", "input list"), ("count", "shard count"), ("total", "input count")):
            if shard.record[key] != first.record[key]:
                raise UsageError(f"cannot merge: {shard.path} was made from a different {words} than {first.path}")
    ordered = sorted(shards, key=lambda s: s.record["start"])
    expected_start = 0
    for shard in ordered:
        start, stop = shard.record["start"], shard.record["stop"]
        if start < expected_start:
            raise UsageError(f"cannot merge: {shard.path} overlaps another shard (inputs {start}–{stop})")
        if start > expected_start:
            raise UsageError(f"cannot merge: no shard covers inputs {expected_start}–{start} (a shard is missing)")
        expected_start = stop
    if expected_start != first.record["total"]:
        raise UsageError(f"cannot merge: no shard covers inputs {expected_start}–{first.record['total']}")


def merge(output: str, shard_paths: list[str], virtual: bool = False, overwrite: bool = False) -> MergeResult:
    """Check the shards and write OUT, a copy (or with ``virtual``, views over the shards); refuses
    gaps, overlaps, duplicates and mismatched settings."""
    if not shard_paths:
        raise UsageError("merge needs at least one shard file")
    check_output(output, resume=False, overwrite=overwrite, can_resume=False)
    for shard in shard_paths:  # never write over one of the inputs
        if os.path.exists(output) and os.path.samefile(output, shard):
            raise UsageError(f"cannot merge into {output}: it is one of the shards being merged")
    shards = sorted((_read_shard(p) for p in dict.fromkeys(map(str, shard_paths))), key=lambda s: s.record["start"])
    if len(shards) != len(shard_paths):
        raise UsageError("cannot merge: the same shard file is named twice")
    _check_compatible(shards)
    building = output + BUILDING_SUFFIX
    try:
        with h5py.File(building, "w") as out:
            _write_merged(out, output, shards, not virtual)
        os.replace(building, output)
    except OSError as err:
        raise VitExtractError(f"cannot write {output}: {err}") from None
    finally:
        if os.path.exists(building):
            os.unlink(building)
    return MergeResult(output, sum(s.rows for s in shards), sum(s.failed for s in shards), len(shards), virtual)


def _big_dataset(out, name, shards, handles, lengths, out_dir: str, copy: bool, flat: bool) -> None:
    """``name`` over all shards, ``lengths[i]`` leading rows from shard i: a copy or a virtual view."""
    row_shape = handles[0][name].shape[1:]
    dtype = handles[0][name].dtype
    total = int(sum(lengths))
    if copy:
        layout = (RAGGED_CHUNK_ROWS, *row_shape) if flat else chunks(row_shape)
        target = out.create_dataset(name, (total, *row_shape), dtype, maxshape=(None, *row_shape), chunks=layout)
        offset = 0
        for length, h5 in zip(lengths, handles):
            for start in range(0, length, COPY_BLOCK):
                stop = min(start + COPY_BLOCK, length)
                target[offset + start : offset + stop] = h5[name][start:stop]
            offset += length
        return
    layout = h5py.VirtualLayout((total, *row_shape), dtype)
    offset = 0
    for shard, length in zip(shards, lengths):
        if length:
            relative = os.path.relpath(os.path.abspath(shard.path), out_dir)
            layout[offset : offset + length] = h5py.VirtualSource(relative, name, shape=(length, *row_shape))
        offset += length
    out.create_virtual_dataset(name, layout, fillvalue=np.nan)  # a missing shard reads as NaN, not zeros


def _write_merged(out: h5py.File, output: str, shards: list[_Shard], copy: bool) -> None:
    roots: list[str] = []
    for shard in shards:
        roots += [r for r in shard.settings["roots"] if r not in roots]
    allow_open_files(len(shards), f"merging {len(shards)} shard files")  # all are open at once below
    handles = [h5py.File(s.path, "r") for s in shards]
    try:
        failed = _merge_row_info(out, shards, handles, roots)
        _merge_arrays(out, shards, handles, os.path.dirname(os.path.abspath(output)), copy)
        attrs = out.attrs
        for attribute in ATTRIBUTES:
            if attribute.merge == "first" and attribute.name in handles[0].attrs:
                attrs[attribute.name] = handles[0].attrs[attribute.name]  # verbatim: resume compares them
        # The devices of the shards that hold rows (an empty shard made none).
        made = [h5.attrs.get("device", "") for s, h5 in zip(shards, handles) if s.rows]
        attrs["device"] = devices_joined(*made) or handles[0].attrs.get("device", "")
    finally:
        for h5 in handles:
            h5.close()
    _merged_state(out.attrs, output, shards, roots, failed, copy)


def _merge_row_info(out: h5py.File, shards: list[_Shard], handles, roots: list[str]) -> int:
    """The small per-image datasets and the failures, written for real with root indices remapped,
    shard by shard and block by block (never every string at once); the number of failures."""
    rows, failed = sum(s.rows for s in shards), sum(s.failed for s in shards)
    text = lambda name, n: out.create_dataset(name, (n,), dtype=STRING, maxshape=(None,))  # noqa: E731
    paths, errors, failed_paths = text("paths", rows), text("failed/errors", failed), text("failed/paths", failed)
    root_index = out.create_dataset("root_index", (rows,), np.int32, maxshape=(None,))
    failed_roots = out.create_dataset("failed/root_index", (failed,), np.int32, maxshape=(None,))
    image_size = out.create_dataset("image_size", (rows, 2), np.int32, maxshape=(None, 2))
    names = json.loads(stored_value(handles[0].attrs, BY_NAME["meta"]))
    metas = {name: text(f"meta/{name}", rows) for name in names}
    masks = {name: out.create_dataset(absent_mask(name), (rows,), np.uint8, maxshape=(None,)) for name in names}
    grids = out.create_dataset("grid_thw", (rows, 3), np.int32, maxshape=(None, 3)) if "grid_thw" in handles[0] else None
    seen: set[bytes] = set()
    at = failed_at = 0
    for shard, h5 in zip(shards, handles):
        remap = np.asarray([roots.index(r) for r in shard.settings["roots"]], dtype=np.int32)
        for start in range(0, shard.rows, TEXT_BLOCK):
            stop = min(start + TEXT_BLOCK, shard.rows)
            keys, index = h5["paths"].asstr()[start:stop], h5["root_index"][start:stop]
            for key, i in zip(keys, index):
                identity = identity_of(shard.settings["roots"][i], key)
                if identity in seen:
                    raise UsageError(f"cannot merge: {key} appears in more than one shard")
                seen.add(identity)
            block = slice(at + start, at + stop)
            paths[block], root_index[block] = keys, remap[index]
            image_size[block] = h5["image_size"][start:stop]
            for name, target in metas.items():
                target[block] = texts = h5[f"meta/{name}"].asstr()[start:stop]
                # shards made before 0.4 have no mask: they stored a missing value as ""
                mask = h5.get(absent_mask(name))
                masks[name][block] = mask[start:stop] if mask is not None else [t == "" for t in texts]
            if grids is not None:
                grids[block] = h5["grid_thw"][start:stop]
        for start in range(0, shard.failed, TEXT_BLOCK):
            stop = min(start + TEXT_BLOCK, shard.failed)
            block = slice(failed_at + start, failed_at + stop)
            failed_paths[block] = h5["failed/paths"].asstr()[start:stop]
            errors[block] = h5["failed/errors"].asstr()[start:stop]
            failed_roots[block] = remap[h5["failed/root_index"][start:stop]]
        at, failed_at = at + shard.rows, failed_at + shard.failed
    return failed


def _merge_arrays(out: h5py.File, shards: list[_Shard], handles, out_dir: str, copy: bool) -> None:
    """The large per-image arrays: copied, or virtual views over the shards."""
    for name in array_names(handles[0].attrs, handles[0]):
        offsets_name, counts_name = ragged_index_names(name)
        flat = offsets_name in handles[0]
        if flat:  # flat (Σ tokens, D): rows per shard are its tokens, up to the last image's end
            offsets = [h5[offsets_name][: s.rows] for s, h5 in zip(shards, handles)]
            counts = [h5[counts_name][: s.rows] for s, h5 in zip(shards, handles)]
            lengths = [int(o[-1]) + int(c[-1]) if len(o) else 0 for o, c in zip(offsets, counts)]
            bases = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            offsets = [o + base for o, base in zip(offsets, bases)]
            out.create_dataset(offsets_name, data=np.concatenate(offsets).astype(np.int64), maxshape=(None,))
            out.create_dataset(counts_name, data=np.concatenate(counts).astype(np.int32), maxshape=(None,))
        else:
            lengths = [s.rows for s in shards]
        _big_dataset(out, name, shards, handles, lengths, out_dir, copy, flat)


def _merged_state(attrs, output: str, shards: list[_Shard], roots: list[str], failed: int, copy: bool) -> None:
    """What a merged file records of itself and of its shards."""
    out_dir = os.path.dirname(os.path.abspath(output))
    attrs["schema_version"] = SCHEMA_VERSION
    attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    attrs["roots"] = json.dumps(roots)
    attrs["committed"] = sum(s.rows for s in shards)
    attrs["failed_committed"] = failed
    attrs["complete"] = True
    attrs["shard"] = "null"
    attrs["merged"] = "copy" if copy else "virtual"
    attrs["shards"] = json.dumps([
        {"file": os.path.relpath(os.path.abspath(s.path), out_dir), "rows": s.rows, "run_id": s.settings.get("run_id"),
         "start": s.record["start"], "stop": s.record["stop"], "index": s.record["index"]}
        for s in shards
    ])
    attrs["inputs_sha256"] = shards[0].record["inputs_sha256"]
