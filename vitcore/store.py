"""The HDF5 schema, in one place: the writer (append, flush, commit counter, resume) and the reader.

Layout (schema_version 1; the README documents it):

    tokens        (N, T, D) or pooled (N, D)   out dtype; chunk = one image (pooled: 128 rows)
    mean          (N, D)                       each image's mean token (only when tokens are unpooled)
    layers/<K>    like tokens                  hidden states after block K (--layer K)
    paths         (N,)  UTF-8                  key of row i, relative to roots[root_index[i]]
    root_index    (N,)  int32
    image_size    (N, 2) int32                 original upright (width, height)
    failed/paths, failed/errors  (M,) UTF-8   key (as for paths) and a one-line reason
    failed/root_index            (M,) int32
    attrs: schema_version, vit_extract_version, created, encoder, weights, preprocessing,
           pooling, projector, compute_dtype, device, out_dtype, layers, roots, committed,
           failed_committed, complete

Write pattern (measurements in reference/hdf5-notes.md): default libver, no SWMR, no
compression; per batch: resize, write rows, flush, then advance ``committed`` and flush again.
Only rows below ``committed`` (and failures below ``failed_committed``) are trusted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator

import h5py
import numpy as np

from vitcore.errors import OutputExistsError, ResumeMismatchError, UsageError, VitExtractError
from vitcore.sources import file_identity, source_path

SCHEMA_VERSION = 1
STRING = h5py.string_dtype("utf-8")
POOLED_CHUNK_ROWS = 128
PER_ROW_CHUNK = 4096  # rows per chunk of the small 1-D / (N, 2) datasets
FAILED_DATASETS = ("failed/paths", "failed/errors", "failed/root_index")
SPACE_MARGIN = 4 << 20  # bytes kept free beyond a batch's size, for HDF5 metadata


@dataclass(frozen=True)
class StoreSettings:
    """Everything the file records about how its rows were made."""

    encoder: str  # EncoderConfig JSON
    weights: str  # WeightsInfo JSON
    weights_identity: str  # what must match on resume (seed or sha256)
    preprocessing: str  # PreprocessConfig JSON
    pooling: str
    projector: str  # JSON: {"dim": P} or null
    compute_dtype: str
    device: str
    out_dtype: str  # "float16" | "float32"
    token_shape: tuple[int, ...]  # per image: (T, D) or (D,)
    layer_shape: tuple[int, ...]  # per image, for layers/<K>
    layers: tuple[int, ...] = ()
    version: str = ""
    shard: str = "null"  # ShardRecord JSON for shard files (--shard, torchrun), else null
    ragged: bool = False  # tokens vary in number per image: flat (total, D) + token_offset + num_tokens
    grid_thw: bool = False  # store each image's patch grid (t, h, w) (Qwen3-VL)
    features: tuple[tuple[str, tuple[int, ...], bool], ...] = ()  # (name, per-image/per-token shape, ragged)

    # Settings that must be equal for --resume, with the words used when they differ.
    RESUME_FIELDS = (
        ("encoder", "encoder"),
        ("weights_identity", "weights"),
        ("preprocessing", "preprocessing"),
        ("pooling", "pooling"),
        ("projector", "projector"),
        ("compute_dtype", "compute dtype"),
        ("out_dtype", "output dtype"),
        ("layers", "--layer list"),
        ("shard", "input list or shard range"),
        ("features_json", "--features list"),
    )

    @property
    def features_json(self) -> str:
        return json.dumps([[n, list(s), r] for n, s, r in self.features])


@dataclass
class Rows:
    """One batch for the writer: n images that succeeded and the failures beside them."""

    keys: list[str]
    root_index: np.ndarray  # (n,) int32, into the file's roots
    image_size: np.ndarray  # (n, 2) int32
    tokens: np.ndarray  # (n, *token_shape); tokens, mean and layers may be torch tensors until append()
    mean: np.ndarray | None = None  # (n, D) when tokens are unpooled
    layers: dict[int, np.ndarray] = field(default_factory=dict)
    failed_keys: list[str] = field(default_factory=list)
    failed_root_index: list[int] = field(default_factory=list)
    failed_errors: list[str] = field(default_factory=list)
    num_tokens: np.ndarray | None = None  # (n,) int32 when tokens are ragged: tokens is (Σ, D)
    grid_thw: np.ndarray | None = None  # (n, 3) int32
    features: dict[str, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)  # name → (values, counts)
    nonfinite: object = None  # images with inf/NaN tokens, counted where they were made (int(·) reads it)
    ready: object = None  # a copy's event (.synchronize()) to wait for before reading the arrays, or None
    release: Callable[[], None] | None = None  # gives the arrays' buffers back once they are written

    def nonfinite_rows(self) -> int:
        """Images whose tokens hold inf or NaN; 0 for ragged tokens. Call on host rows."""
        if self.nonfinite is not None:
            return int(self.nonfinite)
        if self.num_tokens is not None or not len(self.tokens):
            return 0
        return int((~np.isfinite(self.tokens.reshape(len(self.tokens), -1))).any(axis=1).sum())

    def to_host(self) -> "Rows":
        """The same rows with every array in host memory (the encoder may hand over device tensors)."""
        def host(a):
            return a.cpu().numpy() if _is_tensor(a) else a

        return dataclasses.replace(
            self, tokens=host(self.tokens), mean=host(self.mean),
            layers={k: host(v) for k, v in self.layers.items()},
        )

    def nbytes(self) -> int:
        arrays = [self.tokens, self.image_size, self.root_index, *self.layers.values()]
        arrays += [values for values, _ in self.features.values()]
        if self.mean is not None:
            arrays.append(self.mean)
        strings = sum(len(k) + 16 for k in self.keys + self.failed_keys + self.failed_errors)
        return sum(a.nbytes for a in arrays) + strings


def devices_joined(*records: str) -> str:
    """The ``device`` attribute of rows made on several devices: each once, in order ("cuda:0, cpu")."""
    seen: list[str] = []
    for record in records:
        seen += [d for d in (part.strip() for part in str(record).split(",")) if d and d not in seen]
    return ", ".join(seen)


def _is_tensor(value) -> bool:
    """A torch tensor, without importing torch here (reading a file must not load it)."""
    return type(value).__module__.partition(".")[0] == "torch" and hasattr(value, "cpu")


def _chunks(row_shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1, *row_shape) if len(row_shape) == 2 else (POOLED_CHUNK_ROWS, *row_shape)


RAGGED_CHUNK_ROWS = 256  # tokens per chunk of a flat (Σ tokens, D) dataset


def ragged_index_names(name: str) -> tuple[str, str]:
    """The offset and count datasets of a flat dataset: token_offset / num_tokens for tokens."""
    if name == "tokens":
        return "token_offset", "num_tokens"
    return f"{name}_token_offset", f"{name}_num_tokens"


def _create_ragged(h5: h5py.File, name: str, width: int, dtype) -> None:
    h5.create_dataset(name, (0, width), dtype, maxshape=(None, width), chunks=(RAGGED_CHUNK_ROWS, width))
    offsets, counts = ragged_index_names(name)
    h5.create_dataset(offsets, (0,), np.int64, maxshape=(None,), chunks=(PER_ROW_CHUNK,))
    h5.create_dataset(counts, (0,), np.int32, maxshape=(None,), chunks=(PER_ROW_CHUNK,))


def _append(dataset: h5py.Dataset, start: int, values) -> None:
    count = len(values)
    dataset.resize(start + count, axis=0)
    if count:
        dataset[start : start + count] = values


class StoreWriter:
    """The only object that writes an output file. Used from one thread (see AsyncWriter)."""

    def __init__(self, h5: h5py.File, settings: StoreSettings):
        self.h5 = h5
        self.settings = settings
        self.broken = False  # a write failed: the file holds only what was committed before it
        self.nonfinite_rows = 0  # images written with inf or NaN tokens
        self.device_recorded = False  # the device attribute names this run's device (with its first rows)
        self.datasets = {
            name: h5[name] for name in self._row_datasets() + self._ragged_arrays() + list(FAILED_DATASETS)
        }
        self.committed = int(h5.attrs["committed"])
        self.failed_committed = int(h5.attrs["failed_committed"])
        self.flat_rows = {name: self._flat_end(name) for name in self._ragged_arrays()}
        self.roots: list[str] = json.loads(h5.attrs["roots"])

    # -- opening -------------------------------------------------------------------------
    @staticmethod
    def create_file(path: str, settings: StoreSettings, roots: list[str]) -> None:
        """Write a new, empty output and close it. Built under a temporary name and renamed into
        place, so a run killed at any moment leaves no file (or the old one, with --overwrite) or
        a valid one."""
        building = path + ".creating"
        try:
            h5 = _open_h5(building, "w")
        except VitExtractError:
            with contextlib.suppress(OSError):
                os.unlink(building)  # HDF5 may have made the file before failing to write it
            raise
        try:
            StoreWriter._lay_out(h5, settings, roots)
            h5.flush()  # a full disk fails here, while the file is still open (not inside close())
        except (OSError, RuntimeError) as err:
            _drop_unwritable(h5)
            with contextlib.suppress(OSError):
                os.unlink(building)
            raise WriteError(path, 0, err) from None
        h5.close()
        os.replace(building, path)

    @staticmethod
    def _lay_out(h5: h5py.File, settings: StoreSettings, roots: list[str]) -> None:
        """The attributes and the empty, extendable datasets of a new output."""
        attrs = h5.attrs
        attrs["schema_version"] = SCHEMA_VERSION
        attrs["vit_extract_version"] = settings.version
        attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        attrs["run_id"] = uuid.uuid4().hex  # a merged file checks that its shards are still these files
        for name in ("encoder", "weights", "preprocessing", "pooling", "projector",
                     "compute_dtype", "device", "out_dtype"):
            attrs[name] = getattr(settings, name)
        attrs["layers"] = json.dumps(list(settings.layers))
        attrs["shard"] = settings.shard
        attrs["ragged"] = settings.ragged
        attrs["features"] = settings.features_json
        attrs["roots"] = json.dumps(roots)
        attrs["committed"] = 0
        attrs["failed_committed"] = 0
        attrs["complete"] = False
        dtype = np.dtype(settings.out_dtype)
        tokens = settings.token_shape
        if settings.ragged:
            _create_ragged(h5, "tokens", tokens[-1], dtype)
        else:
            h5.create_dataset("tokens", (0, *tokens), dtype, maxshape=(None, *tokens), chunks=_chunks(tokens))
        if len(tokens) == 2 or settings.ragged:
            width = tokens[-1:]
            h5.create_dataset("mean", (0, *width), dtype, maxshape=(None, *width), chunks=_chunks(width))
        for name, shape, ragged in settings.features:
            if ragged:
                _create_ragged(h5, f"features/{name}", shape[-1], dtype)
            else:
                h5.create_dataset(f"features/{name}", (0, *shape), dtype, maxshape=(None, *shape), chunks=_chunks(shape))
        if settings.grid_thw:
            h5.create_dataset("grid_thw", (0, 3), np.int32, maxshape=(None, 3), chunks=(PER_ROW_CHUNK, 3))
        for k in settings.layers:
            shape = settings.layer_shape
            h5.create_dataset(f"layers/{k}", (0, *shape), dtype, maxshape=(None, *shape), chunks=_chunks(shape))
        h5.create_dataset("paths", (0,), STRING, maxshape=(None,), chunks=(PER_ROW_CHUNK,))
        h5.create_dataset("root_index", (0,), np.int32, maxshape=(None,), chunks=(PER_ROW_CHUNK,))
        h5.create_dataset("image_size", (0, 2), np.int32, maxshape=(None, 2), chunks=(PER_ROW_CHUNK, 2))
        h5.create_dataset("failed/paths", (0,), STRING, maxshape=(None,), chunks=(PER_ROW_CHUNK,))
        h5.create_dataset("failed/errors", (0,), STRING, maxshape=(None,), chunks=(PER_ROW_CHUNK,))
        h5.create_dataset("failed/root_index", (0,), np.int32, maxshape=(None,), chunks=(PER_ROW_CHUNK,))

    @classmethod
    def reopen(cls, path: str, settings: StoreSettings) -> "StoreWriter":
        """Open an output prepared by prepare() for appending. Writes nothing itself."""
        return cls(_open_h5(path, "r+"), settings)

    @classmethod
    def prepare(cls, path: str, settings: StoreSettings, roots: list[str], resuming: bool,
                keep_failures: list[int] | None = None) -> None:
        """Get the file ready and close it again, before the decoding workers fork: a new file is
        created; a resumed one loses the rows past the committed counters and takes the roots
        (and, with ``keep_failures``, keeps only those failure records: the others are retried).

        Nothing is written to the file from the main thread while workers run: PyTorch reports a
        dying worker by raising from a signal handler, which could cut an h5py attribute update in
        half (h5py rewrites an attribute as create-temporary, delete, rename).
        """
        if not resuming:
            cls.create_file(path, settings, roots)
            return
        writer = cls.reopen(path, settings)
        try:
            writer._truncate_to_committed(roots, keep_failures)
            writer.h5.flush()  # a full disk fails here, while the file is still open
        except (OSError, RuntimeError) as err:
            writer._abandon_pending_writes()
            writer.close(False)
            raise WriteError(path, writer.committed, err) from None
        writer.datasets.clear()
        writer.h5.close()

    def _truncate_to_committed(self, roots: list[str], keep_failures: list[int] | None) -> None:
        """Resume: drop the rows past the counters and anything a killed run left past them; with
        ``keep_failures``, keep only those failure records (the others are being retried)."""
        for name in self._row_datasets():
            self.datasets[name].resize(self.committed, axis=0)
        for name, end in self.flat_rows.items():
            self.datasets[name].resize(end, axis=0)
        for name in FAILED_DATASETS:
            self.datasets[name].resize(self.failed_committed, axis=0)
        for name, rows in (("paths", self.committed), ("failed/paths", self.failed_committed),
                           ("failed/errors", self.failed_committed)):
            _clear_stale_strings(self.datasets[name], rows)
        if keep_failures is not None and len(keep_failures) < self.failed_committed:
            self._keep_failures(keep_failures)
        attrs = self.h5.attrs
        attrs["complete"] = False
        attrs["roots"] = json.dumps(roots)
        for stale in ("shards", "merged", "inputs_sha256"):  # a merged copy, extended: no longer just its shards
            if stale in attrs:
                del attrs[stale]

    def _keep_failures(self, keep: list[int]) -> None:
        """Rewrite the failure table with only the records at ``keep`` (in their order)."""
        ds = self.datasets
        kept = {name: ds[name][: self.failed_committed][keep] for name in FAILED_DATASETS}
        # Counter first, and flushed: should this run die while the table is rewritten, the next
        # resume sees no failures and decodes those images again, rather than half a table.
        self.failed_committed = 0
        self.h5.attrs["failed_committed"] = 0
        self.h5.flush()
        for name, values in kept.items():
            _append(ds[name], 0, values)
        for name in ("failed/paths", "failed/errors"):
            _clear_stale_strings(ds[name], len(keep))  # the records past the kept ones
        self.failed_committed = len(keep)
        self.h5.attrs["failed_committed"] = len(keep)

    def _row_datasets(self) -> list[str]:
        """Datasets with one row per image (truncated to ``committed`` on resume)."""
        names = ["paths", "root_index", "image_size"]
        if not self.settings.ragged:
            names.append("tokens")
        if "mean" in self.h5:
            names.append("mean")
        if self.settings.grid_thw:
            names.append("grid_thw")
        names += [f"layers/{k}" for k in self.settings.layers]
        names += [f"features/{n}" for n, _, ragged in self.settings.features if not ragged]
        for name in self._ragged_arrays():
            names += list(ragged_index_names(name))
        return names

    def _ragged_arrays(self) -> list[str]:
        """Flat (Σ tokens, D) datasets, indexed through their offset and count datasets."""
        names = ["tokens"] if self.settings.ragged else []
        return names + [f"features/{n}" for n, _, ragged in self.settings.features if ragged]

    def _flat_end(self, name: str) -> int:
        """Rows of a flat dataset that belong to committed images."""
        if not self.committed:
            return 0
        offsets, counts = ragged_index_names(name)
        last = self.committed - 1
        return int(self.h5[offsets][last]) + int(self.h5[counts][last])

    # -- writing -------------------------------------------------------------------------
    def append(self, rows: Rows) -> None:
        """Write one batch (see _append); then its buffers can be reused, whatever happened."""
        try:
            self._append(rows)
        finally:
            if rows.release is not None:
                rows.release()

    def _append(self, rows: Rows) -> None:
        """Write one batch, flush, then advance the counters (the commit point) and flush again.

        Dataset handles are taken once per call and closed explicitly by the flush: HDF5 reports a
        failed write (e.g. a full disk) when chunks leave its cache, and an error raised while h5py
        garbage-collects a handle would be swallowed, so every write must end in our flush().
        """
        if self.broken:
            raise WriteError(self.h5.filename, self.committed, RuntimeError("an earlier write failed"))
        if rows.ready is not None:
            rows.ready.synchronize()  # the copy into these host buffers has finished (transfer.py)
        rows = rows.to_host()
        self.nonfinite_rows += rows.nonfinite_rows()
        self._check_space(rows)
        try:
            flat_ends = self._write(rows)
            self.h5.flush()
            self.flat_rows.update(flat_ends)
            if rows.keys and not self.device_recorded:
                self._record_device()
            self.committed += len(rows.keys)
            self.failed_committed += len(rows.failed_keys)
            self.h5.attrs["committed"] = self.committed
            self.h5.attrs["failed_committed"] = self.failed_committed
            self.h5.flush()
        except (OSError, RuntimeError) as err:
            self._abandon_pending_writes()
            raise WriteError(self.h5.filename, self.committed, err) from None

    def _record_device(self) -> None:
        """With this run's first rows: its device, after those of the rows already in the file
        (a run resumed on another device, say the CPU after a GPU, keeps the GPU's rows)."""
        earlier = self.h5.attrs.get("device", "") if self.committed else ""
        self.h5.attrs["device"] = devices_joined(earlier, self.settings.device)
        self.device_recorded = True

    def _write(self, rows: Rows) -> dict[str, int]:
        """Write a batch's rows; returns the new ends of the flat datasets (applied at commit)."""
        ds, start = self.datasets, self.committed
        flat_ends = {}
        ragged_values = {"tokens": (rows.tokens, rows.num_tokens)} if self.settings.ragged else {}
        ragged_values.update({f"features/{n}": v for n, v in rows.features.items() if v[1] is not None})
        for name, (values, counts) in ragged_values.items():
            flat_start = self.flat_rows[name]
            offsets_name, counts_name = ragged_index_names(name)
            offsets = flat_start + np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else np.empty(0)
            _append(ds[name], flat_start, values)
            _append(ds[offsets_name], start, offsets.astype(np.int64))
            _append(ds[counts_name], start, np.asarray(counts, np.int32))
            flat_ends[name] = flat_start + int(np.sum(counts))
        if not self.settings.ragged:
            _append(ds["tokens"], start, rows.tokens)
        for name, (values, counts) in rows.features.items():
            if counts is None:
                _append(ds[f"features/{name}"], start, values)
        if rows.grid_thw is not None:
            _append(ds["grid_thw"], start, rows.grid_thw)
        if rows.mean is not None:
            _append(ds["mean"], start, rows.mean)
        for k, values in rows.layers.items():
            _append(ds[f"layers/{k}"], start, values)
        _append(ds["paths"], start, rows.keys)
        _append(ds["root_index"], start, rows.root_index)
        _append(ds["image_size"], start, rows.image_size)
        failed = self.failed_committed
        _append(ds["failed/paths"], failed, rows.failed_keys)
        _append(ds["failed/root_index"], failed, np.asarray(rows.failed_root_index, np.int32))
        _append(ds["failed/errors"], failed, rows.failed_errors)
        return flat_ends

    def _check_space(self, rows: Rows) -> None:
        """Stop before a write that cannot fit, rather than let HDF5 fail half-way through it."""
        needed = rows.nbytes() + SPACE_MARGIN
        try:
            stat = os.statvfs(os.path.dirname(os.path.abspath(self.h5.filename)))
        except OSError:
            return
        if stat.f_bavail * stat.f_frsize < needed:
            raise WriteError(self.h5.filename, self.committed, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    def _abandon_pending_writes(self) -> None:
        """After a failed write, point HDF5's file descriptor at /dev/null; the file keeps what it had.

        HDF5 keeps the data it could not write in its caches and retries at every flush and handle
        close; it has no call to drop it, and a handle it cannot close makes the interpreter crash
        at exit (in H5_term_library). Once the descriptor is /dev/null those retries succeed
        without touching the file, which then holds exactly what reached it before the failure:
        the committed rows, as after a kill (resume trusts the counters, not the dataset lengths).
        """
        self.broken = True
        _point_at_devnull(self.h5)

    def close(self, complete: bool) -> None:
        """Record completeness, flush to the disk and close. After a failed write, close quietly."""
        if not self.h5.id.valid:
            return
        try:
            if not self.broken:
                self.h5.attrs["complete"] = bool(complete)
                self.h5.flush()
                os.fsync(self.h5.id.get_vfd_handle())  # flush() does not reach the disk; this does
        except (OSError, RuntimeError, ValueError, TypeError) as err:
            if not self.broken:
                self._abandon_pending_writes()
                raise WriteError(self.h5.filename, self.committed, err) from None
        finally:
            self.datasets.clear()
            try:
                self.h5.close()
            except (OSError, RuntimeError):
                pass  # the committed rows were flushed before the failure; nothing more can be saved


def _point_at_devnull(h5: h5py.File) -> None:
    """Sync what reached the file, then give HDF5 /dev/null in its place (see _abandon_pending_writes).
    Only while the file is open: after a failed close its descriptor may belong to another file."""
    if not h5.id.valid:
        return
    try:
        fd = h5.id.get_vfd_handle()
        with contextlib.suppress(OSError):
            os.fsync(fd)  # what was committed reaches the disk
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, fd, inheritable=False)
        os.close(null)
    except (OSError, RuntimeError, ValueError, TypeError):
        pass  # not a plain POSIX file: leave it


def _drop_unwritable(h5: h5py.File) -> None:
    """Close a file whose writes failed, without HDF5 retrying them (nor crashing at exit)."""
    _point_at_devnull(h5)
    with contextlib.suppress(OSError, RuntimeError):
        h5.close()


def _clear_stale_strings(ds: h5py.Dataset, rows: int) -> None:
    """Overwrite whatever a killed run left past row ``rows`` of a string dataset with the fill value.

    A string element is a reference into HDF5's global heap, and HDF5 frees the string an element
    refers to when the element is written again. After a kill, the chunk holding row ``rows`` can
    carry the dead run's references past the dataset's recorded end (its data reached the disk,
    its new extent did not); writing those rows again would free heap objects that never reached
    the disk, or that new rows now use. Growing the dataset over those chunks and shrinking it back
    makes HDF5 fill them, without following the references.
    """
    chunk = ds.chunks[0]
    stored = [ds.id.get_chunk_info(i).chunk_offset[0] for i in range(ds.id.get_num_chunks())]
    end = max([rows, *stored]) // chunk * chunk + chunk  # past every chunk on the disk (rows included)
    ds.resize(end, axis=0)
    ds.resize(rows, axis=0)


class WriteError(VitExtractError):
    """Writing the output failed (full disk, I/O error); the committed rows are safe."""

    def __init__(self, path: str, committed: int, cause: BaseException):
        text = str(cause)
        full = getattr(cause, "errno", None) == errno.ENOSPC or "errno = 28" in text
        reason = "the disk is full" if full else " ".join(text.split())[:200]
        super().__init__(
            f"writing {path} failed: {reason}. The first {committed} rows are committed and safe; "
            + ("free some space, then " if full else "fix the problem, then ")
            + "rerun the same command with --resume"
        )


def _open_h5(path: str, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except OSError as err:
        if isinstance(err, BlockingIOError):
            reason = "another process has it open (is another vit-extract run writing it?)"
        elif err.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = "the disk is full"
        else:
            reason = os.strerror(err.errno) if err.errno else str(err)
        raise VitExtractError(f"cannot open {path} for writing: {reason}") from None


def _open_for_reading(path: str, verb: str) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except BlockingIOError:
        raise VitExtractError(
            f"cannot {verb} {path}: a vit-extract run is writing it (HDF5 file lock); "
            "try again when that run has finished"
        ) from None
    except OSError as err:
        raise VitExtractError(f"cannot {verb} {path}: not a readable HDF5 file ({err})") from None


class AsyncWriter:
    """Runs a StoreWriter on its own thread behind a small queue, so the device never waits on the disk.

    h5py serialises all HDF5 calls anyway; one thread owns the file. An error in the writer is
    raised in the caller at the next put() or at close().
    """

    def __init__(self, writer: StoreWriter, depth: int = 3):
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vit-extract-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            rows = self._queue.get()
            if rows is None:
                return
            if self._error is None:
                try:
                    self.writer.append(rows)
                except BaseException as err:  # handed to the main thread
                    self._error = err
            elif rows.release is not None:
                rows.release()  # not written after an error, but its buffers go back
            rows = None  # the batch's arrays are freed now, not after the next get()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error  # sticky: once the file is broken, nothing more is written to it

    def put(self, rows: Rows) -> None:
        self._raise_if_failed()
        self._queue.put(rows)

    def close(self, complete: bool) -> None:
        """Drain the queue, record completeness, close the file; re-raise a writer error."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            self.writer.close(False)
            raise self._error
        self.writer.close(complete)


# -- resume ------------------------------------------------------------------------------
@dataclass
class ResumeState:
    done: set[bytes]  # files (sources.file_identity) of the committed rows
    failed: list[bytes]  # files of the recorded failures, in the table's order
    roots: list[str]
    committed: int
    failed_committed: int


def check_resumable(path: str, settings: StoreSettings) -> ResumeState:
    """Read an existing output and refuse, naming the difference, when its settings differ."""
    with _open_for_reading(path, "resume") as h5:
        attrs = h5.attrs
        required = ("schema_version", "committed", "failed_committed", "roots", "encoder", "weights",
                    "preprocessing", "pooling", "projector", "compute_dtype", "out_dtype", "layers")
        if any(name not in attrs for name in required):
            raise ResumeMismatchError(
                f"cannot resume {path}: it is not a complete vit-extract output file; use --overwrite"
            )
        if attrs.get("merged") == "virtual":
            raise ResumeMismatchError(
                f"cannot resume {path}: it is a virtual view over shard files; rerun the launch that made "
                "the shards (they resume) and merge again, or `merge --copy` it into a file that can grow"
            )
        if int(attrs["schema_version"]) != SCHEMA_VERSION:
            raise ResumeMismatchError(
                f"cannot resume {path}: schema version {attrs['schema_version']} "
                f"(this vit-extract writes {SCHEMA_VERSION}); use --overwrite or a new output"
            )
        recorded = {
            "encoder": attrs["encoder"],
            "weights_identity": _weights_identity(json.loads(attrs["weights"])),
            "preprocessing": attrs["preprocessing"],
            "pooling": attrs["pooling"],
            "projector": attrs["projector"],
            "compute_dtype": attrs["compute_dtype"],
            "out_dtype": attrs["out_dtype"],
            "layers": tuple(json.loads(attrs["layers"])),
            "shard": attrs.get("shard", "null"),
            "features_json": attrs.get("features", "[]"),
        }
        for name, words in StoreSettings.RESUME_FIELDS:
            then, now = recorded[name], getattr(settings, name)
            if then != now:
                raise ResumeMismatchError(
                    f"cannot resume {path}: the {words} setting differs (file: {_short(then)}; "
                    f"this run: {_short(now)}); rerun with the file's settings or use --overwrite"
                )
        roots = json.loads(attrs["roots"])
        committed = int(attrs["committed"])
        failed_committed = int(attrs["failed_committed"])
        keys = h5["paths"].asstr()[:committed] if committed else []
        index = h5["root_index"][:committed]
        done = {file_identity(roots[i], k) for i, k in zip(index, keys)}
        failed = []
        if failed_committed:
            keys = h5["failed/paths"].asstr()[:failed_committed]
            index = h5["failed/root_index"][:failed_committed]
            failed = [file_identity(roots[i], k) for i, k in zip(index, keys)]
        return ResumeState(done=done, failed=failed, roots=roots, committed=committed,
                           failed_committed=failed_committed)


def _weights_identity(record: dict) -> str:
    if record.get("source") == "untrained":
        return f"untrained seed {record.get('seed')}"
    return f"sha256 {record.get('sha256')}"


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 160 else text[:157] + "…"


# -- reading -----------------------------------------------------------------------------
class TokenFile:
    """Read a vit-extract output: rows by index or key, batches, settings, failures.

        with vitcore.open_tokens("out.h5") as f:
            x = f["cat.jpg"]          # (T, D) numpy array, or (D,) when pooled
    """

    def __init__(self, path: str | os.PathLike, check_shards: bool = True):
        self.path = os.fspath(path)
        self.h5 = _open_for_reading(self.path, "read")
        missing = [a for a in ("schema_version", "committed", "roots", "encoder") if a not in self.h5.attrs]
        if missing or "tokens" not in self.h5 or "paths" not in self.h5:
            self.h5.close()
            raise VitExtractError(
                f"{self.path} is not a vit-extract output file (missing {', '.join(missing) or 'datasets'})"
            )
        self._keys: list[str] | None = None
        self._index: dict[str, int] | None = None
        if check_shards and self.h5.attrs.get("merged") == "virtual":
            # HDF5 reads a missing shard as NaN, or even a same-named file in the working directory:
            # refuse unless every shard is the very file that was merged.
            bad = [s for s in self._shard_states(json.loads(self.h5.attrs["shards"])) if s["state"] != "complete"]
            if bad:
                self.h5.close()
                raise VitExtractError(
                    f"{self.path} reads through shard files that are {bad[0]['state']} since the merge "
                    f"({', '.join(s['file'] for s in bad[:3])}); restore them beside it, or merge again"
                )

    def __enter__(self) -> "TokenFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.h5.close()

    def __len__(self) -> int:
        return int(self.h5.attrs["committed"])

    @property
    def keys(self) -> list[str]:
        if self._keys is None:
            n = len(self)
            self._keys = list(self.h5["paths"].asstr()[:n]) if n else []
        return self._keys

    def _key_rows(self) -> dict[str, int]:
        if self._index is None:  # a key found under two roots: the first row wins
            self._index = {}
            for i, k in enumerate(self.keys):
                self._index.setdefault(k, i)
        return self._index

    def index(self, key: str) -> int:
        try:
            return self._key_rows()[key]
        except KeyError:
            raise KeyError(f"{key!r} is not a row of {self.path}") from None

    def __contains__(self, key: str) -> bool:
        return key in self._key_rows()

    def _row(self, item: int | str) -> int:
        i = self.index(item) if isinstance(item, str) else int(item)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {item} is out of range for {n} rows")
        return i % n

    def __getitem__(self, item: int | str) -> np.ndarray:
        return self.tokens(item)

    @property
    def ragged(self) -> bool:
        return "token_offset" in self.h5

    def _read(self, name: str, item: int | str) -> np.ndarray:
        """One image's rows of ``name``: a row, or its slice of a flat (Σ tokens, D) dataset."""
        i = self._row(item)
        offsets, counts = ragged_index_names(name)
        if offsets in self.h5:
            start = int(self.h5[offsets][i])
            return self.h5[name][start : start + int(self.h5[counts][i])]
        return self.h5[name][i]

    def tokens(self, item: int | str) -> np.ndarray:
        """(T, D) tokens (T may differ per image when ragged), or (D,) when pooled."""
        return self._read("tokens", item)

    def feature(self, name: str, item: int | str) -> np.ndarray:
        """An extra stored feature of one image (``features/<name>``)."""
        return self._read(f"features/{name}", item)

    def mean(self, item: int | str) -> np.ndarray:
        """The image's mean token (the pooled vector itself for pooled files)."""
        return self.h5[self.vectors_dataset()][self._row(item)]

    def layer(self, k: int, item: int | str) -> np.ndarray:
        return self._read(f"layers/{k}", item)

    def iter_batches(self, batch_size: int = 256, dataset: str = "tokens") -> Iterator[tuple[list[str], np.ndarray]]:
        """(keys, array) for consecutive committed rows of ``dataset`` (tokens, mean, layers/K);
        for a ragged dataset the array is a list of per-image (T_i, D) arrays."""
        data, n = self.h5[dataset], len(self)
        offsets, counts = ragged_index_names(dataset)
        ragged = offsets in self.h5
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if ragged:
                firsts, sizes = self.h5[offsets][start:stop], self.h5[counts][start:stop]
                block = data[int(firsts[0]) : int(firsts[-1] + sizes[-1])] if stop > start else data[0:0]
                base = int(firsts[0]) if stop > start else 0
                yield self.keys[start:stop], [block[o - base : o - base + c] for o, c in zip(firsts, sizes)]
            else:
                yield self.keys[start:stop], data[start:stop]

    def original_path(self, item: int | str) -> bytes:
        """The image file a row came from (bytes: names need not be UTF-8)."""
        i = self._row(item)
        root = self.settings["roots"][int(self.h5["root_index"][i])]
        return source_path(root, self.keys[i])

    @property
    def settings(self) -> dict:
        """The root attributes, with JSON values decoded."""
        out = {}
        for name, value in self.h5.attrs.items():
            if isinstance(value, np.generic):
                value = value.item()
            if name in ("encoder", "weights", "preprocessing", "projector", "layers", "roots", "shard", "shards", "features"):
                value = json.loads(value)
            out[name] = value
        return out

    @property
    def failures(self) -> list[tuple[str, str]]:
        n = int(self.h5.attrs["failed_committed"])
        if not n:
            return []
        return list(zip(self.h5["failed/paths"].asstr()[:n], self.h5["failed/errors"].asstr()[:n]))

    @property
    def token_shape(self) -> tuple[int, ...]:
        """Per image; for ragged tokens (-1, D): the count varies (num_tokens)."""
        shape = tuple(self.h5["tokens"].shape[1:])
        return (-1, *shape) if self.ragged else shape

    def token_grid(self, item: int | str) -> tuple[int, int]:
        """(rows, cols) of the grid a row's tokens lie on, in raster order."""
        i = self._row(item)
        encoder = self.settings["encoder"]
        if "grid_thw" in self.h5:  # Qwen3-VL: merged tokens, spatial_merge_size² patches each
            _, h, w = (int(v) for v in self.h5["grid_thw"][i])
            merge = encoder.get("spatial_merge_size", 1)
            return h // merge, w // merge
        side = encoder["image_size"] // encoder["patch"]
        return side, side

    def vectors_dataset(self) -> str:
        """The (N, D) dataset to search: ``mean`` for unpooled files, ``tokens`` when pooled."""
        return "mean" if "mean" in self.h5 else "tokens"

    @property
    def layers(self) -> list[int]:
        return [int(k) for k in self.settings["layers"]]

    def describe(self, max_failures: int | None = None) -> dict:
        """What `vit-extract info` shows: a JSON-ready summary of the file."""
        settings = self.settings
        failures = self.failures
        datasets = {}
        self.h5.visititems(
            lambda name, obj: datasets.__setitem__(name, {"shape": list(obj.shape), "dtype": str(obj.dtype)})
            if isinstance(obj, h5py.Dataset) else None
        )
        return {
            "file": self.path,
            "rows": len(self),
            "complete": bool(settings.get("complete")),
            "token_shape": list(self.token_shape),
            "out_dtype": settings.get("out_dtype"),
            "pooling": settings.get("pooling"),
            "layers": settings.get("layers"),
            "encoder": settings.get("encoder"),
            "projector": settings.get("projector"),
            "weights": settings.get("weights"),
            "preprocessing": settings.get("preprocessing"),
            "compute_dtype": settings.get("compute_dtype"),
            "device": settings.get("device"),
            "created": settings.get("created"),
            "vit_extract_version": settings.get("vit_extract_version"),
            "schema_version": settings.get("schema_version"),
            "roots": settings.get("roots"),
            "failed": len(failures),
            "failures": [{"path": k, "error": e} for k, e in failures[:max_failures]],
            "datasets": datasets,
            "shard": settings.get("shard"),
            "merged": settings.get("merged"),
            "shards": self._shard_states(settings.get("shards")),
            "features": settings.get("features") or [],
        }

    def _shard_states(self, shards: list[dict] | None) -> list[dict] | None:
        """For a merged file: each shard with its state now (a virtual file reads through them)."""
        if not shards:
            return None
        if self.h5.attrs.get("merged") == "copy":
            return [{**shard, "state": "copied (not needed)"} for shard in shards]
        folder = os.path.dirname(os.path.abspath(self.path))
        states = []
        for shard in shards:
            path = os.path.join(folder, shard["file"])
            state = "missing"
            if os.path.exists(path):
                try:
                    with h5py.File(path, "r") as h5:
                        same = h5.attrs.get("run_id") == shard.get("run_id") and bool(h5.attrs.get("complete"))
                        same = same and int(h5.attrs["committed"]) == shard["rows"]
                    state = "complete" if same else "changed"
                except (OSError, KeyError):
                    state = "unreadable"
            states.append({**shard, "state": state})
        return states


def open_tokens(path: str | os.PathLike, check_shards: bool = True) -> TokenFile:
    return TokenFile(path, check_shards=check_shards)


def check_output(path: str, resume: bool, overwrite: bool, can_resume: bool = True) -> None:
    """Refuse early (before any model is built) an output that cannot or must not be written."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; choose one")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"the output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to the output folder {folder} (permission denied)")
    if os.path.isdir(path):
        raise UsageError(f"the output {path} is a folder; give a file name such as {os.path.join(path, 'tokens.h5')}")
    if os.path.exists(path) and not (resume or overwrite):
        hint = "add --resume to continue it or --overwrite to replace it" if can_resume else "add --overwrite to replace it"
        raise OutputExistsError(f"{path} already exists; {hint}")
