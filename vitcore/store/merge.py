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
import uuid
from dataclasses import dataclass

import h5py
import numpy as np

from vitcore.errors import UsageError, VitExtractError
from vitcore.inputs.base import identity_of
from vitcore.store.output import check_output, output_target, read_as_output
from vitcore.store.encoding import StoredArray, creation_options, readable, same_type, write_at
from vitcore.store.h5open import h5_file
from vitcore.store.reader import StoredTokens
from vitcore.store.schema import (
    ATTRIBUTES,
    BY_NAME,
    RAGGED_CHUNK_ROWS,
    SCHEMA_VERSION,
    STRING,
    absent_before_masks,
    absent_mask,
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


def merge(output: str, shard_paths: list[str], virtual: bool = False, overwrite: bool = False,
          recorded_as: dict[str, str] | None = None) -> MergeResult:
    """Check the shards and write OUT, a copy (or with ``virtual``, views over the shards); refuses
    gaps, overlaps, duplicates and mismatched settings. ``recorded_as``: the name the merged file
    records for a shard read from a local copy (its URL in object storage)."""
    if not shard_paths:
        raise UsageError("merge needs at least one shard file")
    output = output_target(output)  # through a link: its target, not the link replaced
    check_output(output, resume=False, overwrite=overwrite, can_resume=False)
    if read_as_output(output, shard_paths) is not None:  # never write over one of the inputs
        raise UsageError(f"cannot merge into {output}: it is one of the shards being merged")
    shards = sorted((_read_shard(p) for p in dict.fromkeys(map(str, shard_paths))), key=lambda s: s.record["start"])
    if len(shards) != len(shard_paths):
        raise UsageError("cannot merge: the same shard file is named twice")
    _check_compatible(shards)
    building = output + BUILDING_SUFFIX
    try:
        with h5_file(building, "w") as out:
            _write_merged(out, output, shards, not virtual, recorded_as or {})
        os.replace(building, output)
    except OSError as err:
        raise VitExtractError(f"cannot write {output}: {err}") from None
    finally:
        if os.path.exists(building):
            os.unlink(building)
    return MergeResult(output, sum(s.rows for s in shards), sum(s.failed for s in shards), len(shards), virtual)


@dataclass
class _Array:
    """One large per-image array of the shards: tokens, mean, layers/K, features/<name>."""

    name: str
    row_shape: tuple
    dtype: object  # a numpy dtype, or the bfloat16 HDF5 type (encoding.py)
    flat: bool  # (Σ tokens, D), indexed through offset and count datasets
    lengths: list[int]  # rows (flat: tokens) each shard gives


def _write_merged(out: h5py.File, output: str, shards: list[_Shard], copy: bool, recorded_as: dict[str, str]) -> None:
    """Two passes over the shards, one shard file open at a time (a merge of 1,000 shards needs no
    more open files than one of 2): how much each gives, then its rows copied into place."""
    roots: list[str] = []
    for shard in shards:
        roots += [r for r in shard.settings["roots"] if r not in roots]
    with h5_file(shards[0].path, "r") as first:  # the layout, and the settings kept verbatim
        arrays = [_Array(name, first[name].shape[1:], same_type(first[name]), ragged_index_names(name)[0] in first, [])
                  for name in array_names(first.attrs, first)]
        compression = str(stored_value(first.attrs, BY_NAME["compression"]))
        readable(compression, shards[0].path)  # the shards' filter registered before their rows are read
        for attribute in ATTRIBUTES:
            if attribute.merge == "first" and attribute.name in first.attrs:
                out.attrs[attribute.name] = first.attrs[attribute.name]  # verbatim: resume compares them
        meta_names = json.loads(stored_value(first.attrs, BY_NAME["meta"]))
        grid = "grid_thw" in first
        first_device = first.attrs.get("device", "")
    made = []
    for shard in shards:
        with h5_file(shard.path, "r") as h5:
            for array in arrays:
                array.lengths.append(_rows_given(h5, array, shard.rows))
            if shard.rows:  # the devices of the shards that hold rows (an empty shard made none)
                made.append(h5.attrs.get("device", ""))
    out.attrs["device"] = devices_joined(*made) or first_device
    row_info = _RowInfo(out, shards, roots, meta_names, grid)
    images = sum(s.rows for s in shards)
    targets = {a.name: _create_array(out, a, images, copy, compression) for a in arrays}
    for index, shard in enumerate(shards):
        with h5_file(shard.path, "r") as h5:
            row_info.add(h5, shard)
            for array in arrays:
                _copy_array(out, h5, shard, array, index, targets[array.name], row_info.at - shard.rows)
    if not copy:
        out_dir = os.path.dirname(os.path.abspath(output))
        for array in arrays:
            _virtual_array(out, array, shards, out_dir)
    _merged_state(out.attrs, output, shards, roots, row_info.failed_at, copy, recorded_as)


def _rows_given(h5: h5py.File, array: _Array, rows: int) -> int:
    """Rows of ``array`` a shard of ``rows`` images gives: its images, or a flat array's tokens up
    to the last image's end."""
    if not array.flat:
        return rows
    if not rows:
        return 0
    offsets_name, counts_name = ragged_index_names(array.name)
    return int(h5[offsets_name][rows - 1]) + int(h5[counts_name][rows - 1])


def _create_array(out: h5py.File, array: _Array, images: int, copy: bool, compression: str):
    """A copy's full-size dataset (None for a virtual view), and a flat array's offsets and counts
    (one per image)."""
    rows = int(sum(array.lengths))
    if array.flat:
        offsets_name, counts_name = ragged_index_names(array.name)
        out.create_dataset(offsets_name, (images,), np.int64, maxshape=(None,))
        out.create_dataset(counts_name, (images,), np.int32, maxshape=(None,))
    if not copy:
        return None
    layout = (RAGGED_CHUNK_ROWS, *array.row_shape) if array.flat else chunks(array.row_shape)
    return out.create_dataset(array.name, (rows, *array.row_shape), array.dtype, maxshape=(None, *array.row_shape),
                              chunks=layout, **creation_options(compression))


def _copy_array(out: h5py.File, h5: h5py.File, shard: _Shard, array: _Array, index: int, target,
                first_row: int) -> None:
    """One shard's part of ``array``: a flat array's offsets (moved past the shards before it) and
    counts, and for a copy (``target``) its rows, block by block."""
    start_at = int(sum(array.lengths[:index]))
    if array.flat and shard.rows:
        offsets_name, counts_name = ragged_index_names(array.name)
        rows = slice(first_row, first_row + shard.rows)
        out[offsets_name][rows] = h5[offsets_name][: shard.rows].astype(np.int64) + start_at
        out[counts_name][rows] = h5[counts_name][: shard.rows]
    if target is not None:
        length = array.lengths[index]
        for start in range(0, length, COPY_BLOCK):
            stop = min(start + COPY_BLOCK, length)
            write_at(target, start_at + start, StoredArray(h5[array.name])[start:stop])  # as stored: bfloat16 bits unconverted


class _RowInfo:
    """The small per-image datasets and the failures, written for real with root indices remapped,
    shard by shard and block by block (never every string at once)."""

    def __init__(self, out: h5py.File, shards: list[_Shard], roots: list[str], meta_names: list[str], grid: bool):
        rows, failed = sum(s.rows for s in shards), sum(s.failed for s in shards)
        text = lambda name, n: out.create_dataset(name, (n,), dtype=STRING, maxshape=(None,))  # noqa: E731
        self.roots = roots
        self.paths, self.errors, self.failed_paths = text("paths", rows), text("failed/errors", failed), \
            text("failed/paths", failed)
        self.root_index = out.create_dataset("root_index", (rows,), np.int32, maxshape=(None,))
        self.failed_roots = out.create_dataset("failed/root_index", (failed,), np.int32, maxshape=(None,))
        self.image_size = out.create_dataset("image_size", (rows, 2), np.int32, maxshape=(None, 2))
        self.metas = {name: text(f"meta/{name}", rows) for name in meta_names}
        self.masks = {name: out.create_dataset(absent_mask(name), (rows,), np.uint8, maxshape=(None,)) for name in meta_names}
        self.grids = out.create_dataset("grid_thw", (rows, 3), np.int32, maxshape=(None, 3)) if grid else None
        self.seen: set[bytes] = set()
        self.at = self.failed_at = 0  # rows and failures written so far

    def add(self, h5: h5py.File, shard: _Shard) -> None:
        """One shard's rows and failures, after those of the shards before it."""
        remap = np.asarray([self.roots.index(r) for r in shard.settings["roots"]], dtype=np.int32)
        for start in range(0, shard.rows, TEXT_BLOCK):
            stop = min(start + TEXT_BLOCK, shard.rows)
            keys, index = h5["paths"].asstr()[start:stop], h5["root_index"][start:stop]
            for key, i in zip(keys, index):
                identity = identity_of(shard.settings["roots"][i], key)
                if identity in self.seen:
                    raise UsageError(f"cannot merge: {key} appears in more than one shard")
                self.seen.add(identity)
            block = slice(self.at + start, self.at + stop)
            self.paths[block], self.root_index[block] = keys, remap[index]
            self.image_size[block] = h5["image_size"][start:stop]
            for name, target in self.metas.items():
                target[block] = texts = h5[f"meta/{name}"].asstr()[start:stop]
                mask = h5.get(absent_mask(name))  # shards made before 0.4 have none
                self.masks[name][block] = mask[start:stop] if mask is not None else absent_before_masks(texts)
            if self.grids is not None:
                self.grids[block] = h5["grid_thw"][start:stop]
        for start in range(0, shard.failed, TEXT_BLOCK):
            stop = min(start + TEXT_BLOCK, shard.failed)
            block = slice(self.failed_at + start, self.failed_at + stop)
            self.failed_paths[block] = h5["failed/paths"].asstr()[start:stop]
            self.errors[block] = h5["failed/errors"].asstr()[start:stop]
            self.failed_roots[block] = remap[h5["failed/root_index"][start:stop]]
        self.at += shard.rows
        self.failed_at += shard.failed


def _virtual_array(out: h5py.File, array: _Array, shards: list[_Shard], out_dir: str) -> None:
    """``array`` as an HDF5 virtual dataset over the shards, named by relative paths."""
    dtype = h5py.Datatype(array.dtype) if isinstance(array.dtype, h5py.h5t.TypeID) else array.dtype  # bfloat16
    layout = h5py.VirtualLayout((int(sum(array.lengths)), *array.row_shape), dtype)
    offset = 0
    for shard, length in zip(shards, array.lengths):
        if length:
            relative = os.path.relpath(os.path.abspath(shard.path), out_dir)
            layout[offset : offset + length] = h5py.VirtualSource(relative, array.name, shape=(length, *array.row_shape))
        offset += length
    out.create_virtual_dataset(array.name, layout, fillvalue=np.nan)  # a missing shard reads as NaN, not zeros


def _merged_state(attrs, output: str, shards: list[_Shard], roots: list[str], failed: int, copy: bool,
                  recorded_as: dict[str, str]) -> None:
    """What a merged file records of itself and of its shards."""
    out_dir = os.path.dirname(os.path.abspath(output))
    attrs["schema_version"] = SCHEMA_VERSION
    attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    attrs["run_id"] = uuid.uuid4().hex  # this file's own identity (readers check it has not been replaced)
    attrs["roots"] = json.dumps(roots)
    attrs["committed"] = sum(s.rows for s in shards)
    attrs["failed_committed"] = failed
    attrs["complete"] = True
    attrs["shard"] = "null"
    attrs["merged"] = "copy" if copy else "virtual"
    attrs["shards"] = json.dumps([
        {"file": recorded_as.get(s.path) or os.path.relpath(os.path.abspath(s.path), out_dir), "rows": s.rows, "run_id": s.settings.get("run_id"),
         "start": s.record["start"], "stop": s.record["stop"], "index": s.record["index"]}
        for s in shards
    ])
    attrs["inputs_sha256"] = shards[0].record["inputs_sha256"]
