"""Writing an output file: the writer (append, flush, commit counter, resume truncation), its
thread, and what happens when a write fails.

Write pattern (measured: the README's Reliability section): default libver, no SWMR, no
compression; per batch: resize, write rows, flush, then advance ``committed`` and flush again.
Only rows below ``committed`` (and failures below ``failed_committed``) are trusted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import threading
import time
import uuid
from typing import Callable

import h5py
import numpy as np

from vitcore.errors import VitExtractError, one_line
from vitcore.store.encoding import write_at
from vitcore.store.h5open import h5_file
from vitcore.system.units import shown_size
from vitcore.store.schema import (
    FAILED_DATASETS,
    PER_ROW_CHUNK,
    Rows,
    StoreSettings,
    absent_before_masks,
    devices_joined,
    flat_datasets,
    absent_mask,
    lay_out,
    ragged_index_names,
    row_datasets,
)

SPACE_MARGIN = 4 << 20  # bytes kept free beyond a batch's size, for HDF5 metadata

BUILDING_SUFFIX = ".creating"  # a new output (or a merge) is built under this name, then renamed


def free_bytes(folder: str) -> int | None:
    """Bytes the current user may still write under ``folder`` (None: unknown)."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


class WriteHooks:
    """The write path's seams for tests that play a failing disk (set an attribute to a callable).

    free_bytes(folder) → bytes: the free-space probe run before each batch.
    before_create(path): run while a new file is laid out; raise OSError to fail there.
    before_write(writer, rows): run before each batch is written; raise OSError to fail there.
    """

    def __init__(self) -> None:
        self.free_bytes: Callable[[str], int | None] = free_bytes
        self.before_create: Callable[[str], None] | None = None
        self.before_write: Callable[["StoreWriter", Rows], None] | None = None


HOOKS = WriteHooks()


def _add_absent_masks(h5: h5py.File, names) -> None:
    """Files made before 0.4 have no absence masks: resumed, each gets one from its texts (those
    files stored a missing value as "", so "" reads as missing there)."""
    for name in names:
        if absent_mask(name) not in h5:
            committed = int(h5.attrs["committed"])
            texts = h5[f"meta/{name}"].asstr()[:committed] if committed else []
            h5.create_dataset(absent_mask(name), data=absent_before_masks(texts), maxshape=(None,),
                              chunks=(PER_ROW_CHUNK,))


def _append(dataset: h5py.Dataset, start: int, values) -> None:
    count = len(values)
    dataset.resize(start + count, axis=0)
    if count:
        write_at(dataset, start, values)


class StoreWriter:
    """The only object that writes an output file. Used from one thread (see AsyncWriter)."""

    def __init__(self, h5: h5py.File, settings: StoreSettings):
        self.h5 = h5
        self.settings = settings
        self.broken = False  # a write failed: the file holds only what was committed before it
        self.nonfinite_rows = 0  # images written with inf or NaN tokens
        self.device_recorded = False  # the device attribute names this run's device (with its first rows)
        if h5.mode == "r+":
            _add_absent_masks(h5, settings.meta)
        self.datasets = {
            name: h5[name] for name in row_datasets(settings) + flat_datasets(settings) + list(FAILED_DATASETS)
        }
        self.committed = int(h5.attrs["committed"])
        self.failed_committed = int(h5.attrs["failed_committed"])
        self.flat_rows = {name: self._flat_end(name) for name in flat_datasets(settings)}
        self.roots: list[str] = json.loads(h5.attrs["roots"])

    # -- opening -------------------------------------------------------------------------
    @staticmethod
    def create_file(path: str, settings: StoreSettings, roots: list[str]) -> None:
        """Write a new, empty output and close it. Built under a temporary name and renamed into
        place, so a run killed at any moment leaves no file (or the old one, with --overwrite) or
        a valid one."""
        building = path + BUILDING_SUFFIX
        try:
            h5 = _open_h5(building, "w")
        except VitExtractError:
            with contextlib.suppress(OSError):
                os.unlink(building)  # HDF5 may have made the file before failing to write it
            raise
        try:
            if HOOKS.before_create is not None:
                HOOKS.before_create(path)
            lay_out(h5, settings, roots, {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_id": uuid.uuid4().hex})
            h5.flush()  # a full disk fails here, while the file is still open (not inside close())
        except (OSError, RuntimeError) as err:
            _drop_unwritable(h5)
            with contextlib.suppress(OSError):
                os.unlink(building)
            raise WriteError(path, 0, err) from None
        h5.close()
        os.replace(building, path)

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
        for name in row_datasets(self.settings):
            self.datasets[name].resize(self.committed, axis=0)
        for name, end in self.flat_rows.items():
            self.datasets[name].resize(end, axis=0)
        for name in FAILED_DATASETS:
            self.datasets[name].resize(self.failed_committed, axis=0)
        texts = [("paths", self.committed), ("failed/paths", self.failed_committed),
                 ("failed/errors", self.failed_committed)] + [(f"meta/{m}", self.committed) for m in self.settings.meta]
        for name, rows in texts:
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
        if HOOKS.before_write is not None:
            HOOKS.before_write(self, rows)
        ds, start = self.datasets, self.committed
        flat_ends = {}
        for name, values in rows.arrays.items():
            if name not in rows.counts:
                _append(ds[name], start, values)
                continue
            counts = rows.counts[name]
            flat_start = self.flat_rows[name]
            offsets_name, counts_name = ragged_index_names(name)
            offsets = flat_start + np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else np.empty(0)
            _append(ds[name], flat_start, values)
            _append(ds[offsets_name], start, offsets.astype(np.int64))
            _append(ds[counts_name], start, np.asarray(counts, np.int32))
            flat_ends[name] = flat_start + int(np.sum(counts))
        if rows.grid_thw is not None:
            _append(ds["grid_thw"], start, rows.grid_thw)
        _append(ds["paths"], start, rows.keys)
        for name in self.settings.meta:
            texts = rows.meta.get(name, [None] * len(rows.keys))  # None: the row has no such text
            _append(ds[f"meta/{name}"], start, ["" if t is None else t for t in texts])
            _append(ds[absent_mask(name)], start, np.asarray([t is None for t in texts], np.uint8))
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
        free = HOOKS.free_bytes(os.path.dirname(os.path.abspath(self.h5.filename)))
        if free is not None and free < needed:
            raise WriteError(self.h5.filename, self.committed, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                             reason=f"{shown_size(free)} left on its disk, less than the next batch needs "
                                    f"({shown_size(needed)}, with {shown_size(SPACE_MARGIN)} kept free for HDF5)")

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

    def __init__(self, path: str, committed: int, cause: BaseException, reason: str | None = None):
        """``reason``: the words for it, where the writer knows better than the cause (its own room check)."""
        text = str(cause)
        full = getattr(cause, "errno", None) == errno.ENOSPC or "errno = 28" in text
        reason = reason or ("the disk is full" if full else one_line(text))
        super().__init__(
            f"writing {path} failed: {reason}. The first {committed} rows are committed and safe; "
            + ("free some space, then " if full else "fix the problem, then ")
            + "rerun the same command with --resume"
        )


def _open_h5(path: str, mode: str) -> h5py.File:
    try:
        return h5_file(path, mode)
    except OSError as err:
        if isinstance(err, BlockingIOError):
            reason = "another process has it open (is another vit-extract run writing it?)"
        elif err.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = "the disk is full"
        else:
            reason = os.strerror(err.errno) if err.errno else str(err)
        raise VitExtractError(f"cannot open {path} for writing: {reason}") from None


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
