"""extract(): sources → loader → encoder → store, with progress callbacks.

One direction, no back-and-forth, in named steps (each a function below):

    check_run          (checks.py, torch-free) the options, the family that takes --model /
                       --weights and its option checks, the output, the inputs (and this run's shard)
    Output             check and lock the output (store/output.py)
    family.record      what the file will record, from the options and checkpoint files (nothing built)
    plan_resume        what a resumed file already holds (refusing other settings): the inputs left to do
    family.build       the encoder, device side and worker side; only when inputs are left to do
    make_loader        DataLoader workers decode (batch size and worker count chosen here)
    run_batches        the loop: batches → BatchRunner (batching.py) → writer thread; Ctrl-C safe
    ExtractResult      what happened, for the summary and --json
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from vitcore.run.batching import BatchRunner
from vitcore.run.compile_choice import choose_compile
from vitcore.system.calibrate import slow_half_note
from vitcore.run.settings import store_settings
from vitcore.system.host_memory import HeapWatch
from vitcore.system.device import choose_dtype, dtype_name, resolve_device
from vitcore.errors import Interrupted, VitExtractError, one_line
from vitcore.imaging.loader import Batch, default_workers, make_loader
from vitcore.imaging.video import is_video_name
from vitcore.options import ComputeOptions, ExtractOptions
from vitcore.run.checks import CheckedRun, check_run, output_named
from vitcore.run.notes import counted_notes
from vitcore.store.lock import UNLOCKED_NOTE
from vitcore.inputs.base import Discovery
from vitcore.inputs.discover import close_readers
from vitcore.store import Output, Rows
from vitcore.store.remote_output import upload
from vitcore.store.resume import recorded_compute_dtype
from vitcore.inputs.remote import public_url
from vitcore.system.workers import init_worker, shut_down, worker_deaths_held

__all__ = ["ExtractOptions", "ExtractResult", "Progress", "StopFlag", "extract"]


@dataclass
class Progress:
    done: int  # inputs handled this run (rows written + failures)
    total: int  # inputs this run has to handle
    failed: int
    elapsed: float  # seconds since the first batch was requested
    noun: str = "images"  # what is counted: "inputs" when clips are among them


@dataclass
class ExtractResult:
    output: str
    found: int  # inputs discovered
    skipped: int  # already in the file (--resume)
    written: int  # rows written by this run
    rows: int  # rows in the file now
    failures: list[tuple[str, str]]  # (key, reason) of this run's failed images
    seconds: float
    images_per_second: float
    device: str
    compute_dtype: str
    out_dtype: str
    encoder: str  # preset name or "custom"
    token_shape: tuple[int, ...]  # per image; (-1, D) when the count varies (as TokenFile.token_shape)
    weights: str  # human description
    untrained: bool
    complete: bool
    duplicates_dropped: int = 0
    failed_earlier: int = 0  # failure records of earlier runs the file keeps (not tried again)
    timings: dict[str, float] = field(default_factory=dict)  # seconds waiting on decode / compute / writer
    batch_size: int | None = None  # images per batch as run (auto resolved); None when nothing ran
    workers: int | None = None  # decoding worker processes as run
    warnings: list[str] = field(default_factory=list)  # things the user should know (e.g. batch split)
    missing_meta: dict[str, int] = field(default_factory=dict)  # --keep / --columns name → rows without that text
    nonfinite_meta: dict[str, int] = field(default_factory=dict)  # --columns name → rows with NaN/inf stored as null
    dtype_reason: str | None = None  # --dtype auto: what it chose and why (None: the dtype was named)
    compile_reason: str | None = None  # --compile auto: compiled or eager, by what measurement (None: not measured)
    passed_over: dict[str, int] = field(default_factory=dict)  # extension → files in folders not taken (--ext)
    entries_passed_over: dict[str, int] = field(default_factory=dict)  # kind (inputs.base.ENTRY_KINDS) → entries
    clips: int = 0  # of the rows written, those that are video clips (the rest are pictures)
    decoding: str | None = None  # where decoding ran when not in this process's workers (--engine ray)

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        record["failures"] = [{"path": k, "error": e} for k, e in self.failures]
        record["token_shape"] = list(self.token_shape)
        return record


class StopFlag:
    """Set by SIGINT / SIGTERM; the loop checks it between batches and stops after a commit.
    While the main thread waits for the workers' next batch, a signal ends the wait at once."""

    def __init__(self, announce: Callable[[int], None] | None = None) -> None:
        self.announce = announce  # told the signal at once (a batch in flight may take seconds to finish)
        self.signal_number: int | None = None
        self.waiting = False  # the main thread is waiting for a batch (nothing of the output is touched)
        self.overdue = False  # the wait outlasted STOP_GRACE after the signal: end it

    def set(self, signal_number: int = signal.SIGINT) -> None:
        self.signal_number = signal_number

    def is_set(self) -> bool:
        return self.signal_number is not None


STOP_GRACE = 3.0  # seconds a stopping run waits for the batch being decoded


class StopWhileWaiting(Exception):
    """A signal arrived while the main thread waited for a batch: stop without waiting for it."""


@contextlib.contextmanager
def stop_on_signals(stop: StopFlag):
    """While extracting: SIGINT/SIGTERM only set the flag (a second SIGINT aborts at once).

    A plain KeyboardInterrupt is not enough: raised inside h5py's weakref callbacks it can be
    swallowed. Only installed from the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    # A run started in the background of a script (cmd &) inherits SIGINT ignored: it keeps ignoring
    # the user's, and takes only the watchdog's own (sent to end a wait).
    ignored = {s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is signal.SIG_IGN}

    def handler(signum, frame):
        if stop.overdue:  # from the watchdog below, not from the user
            stop.overdue = False
            if stop.waiting:
                raise StopWhileWaiting
            return
        if signum in ignored:
            return
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        first = not stop.is_set()
        stop.set(signum)
        if first and stop.announce is not None:  # (once: a second SIGTERM, say, changes nothing)
            try:
                stop.announce(signum)
            except Exception:  # noqa: BLE001 - a notice must not break the stop
                pass
        if stop.waiting:
            threading.Thread(target=watchdog, name="vit-extract-stop", daemon=True).start()

    def watchdog():
        """A batch normally arrives within seconds and the loop stops after committing it; a worker
        stuck in a read (a hung mount) must not hold the run, so the wait is ended after a grace."""
        time.sleep(STOP_GRACE)
        if stop.waiting:
            stop.overdue = True
            # A real signal to the main thread: it ends the wait the main thread is blocked in at once
            # (interrupt_main only sets a flag, seen when PyTorch's 5 s queue timeout returns).
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # runs handler above

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def extract(
    paths=(),
    output: str = "tokens.h5",
    options: ExtractOptions | None = None,
    *,
    progress: bool | Callable[[Progress], None] = False,
    stop: StopFlag | None = None,
    stdin=None,
    checked: CheckedRun | None = None,
    encoders: dict | None = None,
    make_batches: Callable | None = None,
    **overrides,
) -> ExtractResult:
    """Extract visual tokens for every image under ``paths`` into the HDF5 file ``output``.

    Options come from ``options`` and/or keyword overrides (``extract("photos", "out.h5",
    model="small", pool="mean")``). ``progress=True`` draws a tqdm bar on stderr; a callable
    receives a Progress after every batch. Raises VitExtractError subclasses for problems a
    person can fix; image failures are not errors (they are in the result and the file).
    ``checked``: what checks.check_run already found for these arguments (the CLI checks them
    before it loads torch, so a usage error is reported at once). ``encoders``: a dict the caller
    keeps to reuse an encoder built by an earlier call with the same settings (a Ray actor's units).
    ``make_batches(sources, image_loader, batch_size, workers, pin_memory, meta, max_image_pixels)``: where the decoded
    batches come from instead of this process's DataLoader workers (a Ray actor's decoding tasks).
    """
    run = checked or check_run(paths, output, options, stdin=stdin, **overrides)  # before torch is needed
    if run.upload_to is None:
        return _extract(run, progress, stop, encoders, make_batches)
    try:  # -o URL: the staged file is uploaded whole, done or stopped by a signal (its committed rows)
        with output_named(run):
            result = _extract(run, progress, stop, encoders, make_batches)
    except Interrupted:
        upload(run.output, run.upload_to, complete=False)
        raise
    upload(run.output, run.upload_to, complete=result.complete)
    return dataclasses.replace(result, output=public_url(run.upload_to))


def _extract(run: CheckedRun, progress, stop: StopFlag | None, encoders: dict | None = None,
             make_batches: Callable | None = None) -> ExtractResult:
    encoder_opts, compute, out_opts = run.encoder, run.compute, run.output_options
    family, found, shard, output = run.family, run.found, run.shard, run.output
    device = resolve_device(compute.device)
    with Output(output, out_opts.resume, out_opts.overwrite) as out:  # one run per output
        record = family.record(encoder_opts, device)  # what the file records: nothing built yet
        resuming = recorded_compute_dtype(output) if out_opts.resume and compute.dtype == "auto" else None
        chosen = choose_dtype(compute.dtype, device, record.width, resuming)  # auto: measured for this width
        dtype = chosen.dtype
        containers = run.inputs.containers
        meta = containers.meta_names  # --keep / --columns: text stored beside the tokens
        settings = store_settings(record, out_opts.pool, out_opts.out_dtype, device, dtype,
                                  shard.to_json() if shard is not None else "null", meta, containers.image_column,
                                  found.image_columns, out_opts.compression)
        plan = plan_resume(out, found, settings, out_opts.retry_failed)
        if plan.sources:
            built = _build(family, encoder_opts, device, dtype, record, encoders)
            batch_size, workers = choose_batching(compute, built, len(plan.sources))
            if make_batches is None:
                loader = make_loader(plan.sources, built.loader, batch_size, workers, pin_memory=device.type == "cuda",
                                     worker_init_fn=init_worker, meta=meta, max_image_pixels=run.inputs.max_image_pixels)
            else:
                loader = make_batches(plan.sources, built.loader, batch_size, workers, device.type == "cuda", meta,
                                      run.inputs.max_image_pixels)
            what = f"{record.encoder_record} | outputs {[spec.name for spec in record.outputs]}"
            compiling = choose_compile(compute.compile, built.compiled_encode is not None, device, what, dtype,
                                       batch_size, len(plan.sources))
            runner = BatchRunner(built, settings, device, compile=compiling)
        else:  # a resume with nothing left to do: no encoder is built and no worker started
            built, loader, runner, batch_size, workers = None, None, None, None, None
        out.prepare(settings, plan.roots, plan.keep_failures)  # before the workers fork
        ran = run_batches(out, loader, plan, runner, progress, stop or StopFlag())
    notes = list(record.notes) if built is None else list(built.notes)
    if out.unlocked:
        notes.append(UNLOCKED_NOTE)
    if built is not None and device.type == "cpu" and dtype == torch.float16 and record.width:
        notes += filter(None, [slow_half_note(record.width)])
    if built is not None and built.finish_batch is not None:
        notes += built.finish_batch.notes()
    if runner is not None and runner.compile_seconds:
        ran.timings["compile"] = runner.compile_seconds  # part of "compute"
    return ExtractResult(
        output=output,
        found=len(found.sources),
        skipped=plan.skipped,
        written=ran.written,
        clips=ran.clips,
        rows=ran.committed,
        failures=ran.failures,
        seconds=ran.seconds,
        images_per_second=ran.written / ran.seconds if ran.seconds > 0 else 0.0,
        device=str(device),
        compute_dtype=dtype_name(dtype),
        dtype_reason=chosen.reason,
        compile_reason=runner.choice.reason if runner is not None else None,
        out_dtype=out_opts.out_dtype,
        encoder=record.name,
        token_shape=(-1, *settings.token_shape) if settings.ragged else settings.token_shape,
        weights=record.weights.describe(),
        untrained=record.weights.untrained,
        complete=ran.complete,
        duplicates_dropped=found.skipped_duplicates,
        failed_earlier=plan.failed_earlier,
        timings=ran.timings,
        batch_size=batch_size,
        workers=workers,
        warnings=found.notes + found.input_notes + notes + (runner.warnings if runner else []) + _nonfinite_note(ran.nonfinite_rows, out_opts.out_dtype)
        + counted_notes(ran.missing_meta, found.passed_over, found.entries_passed_over, ran.nonfinite_meta,
                        family.takes_video),
        missing_meta=ran.missing_meta,
        nonfinite_meta=ran.nonfinite_meta,
        passed_over=found.passed_over,
        entries_passed_over=found.entries_passed_over,
    )


@dataclass
class ResumePlan:
    sources: list  # the inputs this run handles, root indices into ``roots``
    roots: list[str]  # the file's roots, then any new ones
    skipped: int = 0  # inputs the file already holds (rows or failure records)
    keep_failures: list[int] | None = None  # --retry-failed: the failure records kept (images not retried)
    unlisted: list = field(default_factory=list)  # folders that could not be listed, not yet recorded
    failed_earlier: int = 0  # failure records of earlier runs kept (not tried again)


def plan_resume(out: Output, found: Discovery, settings, retry_failed: bool) -> ResumePlan:
    """Resume: keep the file's roots (row root_index values point into them), skip what it holds."""
    state = out.resume_state(settings)  # refuses a file made with other settings
    if state is None:
        return ResumePlan(found.sources, list(found.roots), unlisted=found.unlisted)
    roots = state.roots + [r for r in found.roots if r not in state.roots]
    remap = [roots.index(r) for r in found.roots]
    failed = set(state.failed)
    skip = state.done | failed
    keep_failures = None
    folders = {u.identity(found.roots): u for u in found.unlisted}
    if retry_failed:  # only failures among this run's inputs: the others' records stay
        # A record of a whole container (cut short, missing, unreadable) is tried again with it.
        retried = failed & ({s.identity for s in found.sources} | set(folders) | found.containers)
        skip -= retried
        keep_failures = [i for i, f in enumerate(state.failed) if f not in retried]
    sources = [dataclasses.replace(s, root_index=remap[s.root_index]) for s in found.sources if s.identity not in skip]
    unlisted = [dataclasses.replace(u, root_index=remap[u.root_index]) for i, u in folders.items() if i not in skip]
    earlier = len(keep_failures) if keep_failures is not None else len(state.failed)
    return ResumePlan(sources, roots, len(found.sources) - len(sources), keep_failures, unlisted, earlier)


def choose_batching(compute: ComputeOptions, built, inputs: int) -> tuple[int, int]:
    """(batch size, decoding workers): as asked, or the family's default for the device."""
    batch_size = built.default_batch_size() if compute.batch_size == "auto" else compute.batch_size
    workers = default_workers() if compute.workers is None else compute.workers
    return batch_size, min(workers, max(1, inputs // batch_size + 1)) if workers else 0


def _build(family, encoder_opts, device, dtype, record, encoders: dict | None):
    """The family's encoder for this run; with ``encoders``, the one built before for the same record,
    device and dtype (one kept: a new one replaces it)."""
    if encoders is None:
        return family.build(encoder_opts, device, dtype, record=record)
    key = (repr(record), str(device), str(dtype))
    if key not in encoders:
        encoders.clear()  # its memory first
        encoders[key] = family.build(encoder_opts, device, dtype, record=record)
    return encoders[key]


@dataclass
class LoopOutcome:
    written: int
    clips: int  # of those written, video clips
    failures: list[tuple[str, str]]
    committed: int
    nonfinite_rows: int
    complete: bool
    seconds: float
    timings: dict[str, float]
    missing_meta: dict[str, int]  # --keep / --columns name → rows stored with no such text
    nonfinite_meta: dict[str, int]  # --columns name → rows whose NaN or infinite numbers became null


def run_batches(out: Output, loader, plan: ResumePlan, runner: BatchRunner, progress, stop: StopFlag) -> LoopOutcome:
    """Decoded batches → encoder → writer thread, until the inputs run out or a signal stops it."""
    sources = plan.sources
    started = time.perf_counter()
    timings = {"decode_wait": 0.0, "compute": 0.0, "writer_wait": 0.0}
    done = written = clips = 0
    noun = "inputs" if any(is_video_name(s.key) for s in sources) else "images"
    missing_meta: dict[str, int] = {}
    nonfinite_meta: dict[str, int] = {}
    failures: list[tuple[str, str]] = [(u.key, u.reason) for u in plan.unlisted]
    reporter = _make_reporter(progress, len(sources))
    heap = HeapWatch()
    batches = None
    complete = False
    writer = None
    try:
        reporter(Progress(0, len(sources), 0, 0.0, noun))
        batches = iter(loader) if sources else iter(())  # the workers fork here, before the file opens for writing
        async_writer = out.open_writer()  # (a failure here shuts the workers down below)
        if plan.unlisted:  # first: the folders whose contents were not looked at
            async_writer.put(_folder_records(plan.unlisted))
        with stop_on_signals(stop), torch.inference_mode():
            while not stop.is_set():
                tick = time.perf_counter()
                try:
                    stop.waiting = True
                    batch = _next_batch(batches)
                except StopWhileWaiting:
                    break  # the batch being decoded is not committed: a resume decodes it again
                finally:
                    stop.waiting = False
                if batch is None:
                    break
                timings["decode_wait"] += time.perf_counter() - tick
                tick = time.perf_counter()
                rows = runner(batch, sources)
                timings["compute"] += time.perf_counter() - tick
                tick = time.perf_counter()
                async_writer.put(rows)
                del rows  # the writer thread holds the batch now; its buffers go when it is written
                timings["writer_wait"] += time.perf_counter() - tick
                written += len(batch.indices)
                clips += sum(is_video_name(sources[i].key) for i in batch.indices)
                _count_missing(batch, missing_meta, nonfinite_meta)
                failures += [(sources[f.index].key, f.error) for f in batch.failures]
                done += len(batch.indices) + len(batch.failures)
                heap.after_batch()  # memory flat in the number of images
                reporter(Progress(done, len(sources), len(failures), time.perf_counter() - started, noun))
        complete = not stop.is_set()
    except RuntimeError as err:
        # PyTorch raises a dead worker (say, killed by the OOM killer) from its SIGCHLD handler,
        # wherever the main thread happens to be: not only in next(), so it is caught here.
        if "DataLoader worker" not in str(err):
            raise
        raise VitExtractError(
            f"an image-decoding worker process died ({one_line(err, 160)}); the committed "
            "rows are safe: rerun with --resume (and fewer --workers if memory is short)"
        ) from None
    finally:
        with worker_deaths_held():  # cleanup must not be cut short by a dying worker's SIGCHLD
            reporter(None)
            if batches is not None:
                shut_down(batches, urgent=stop.is_set())  # stopped by a signal: no wait for a worker
            del batches
            close_readers()  # what this process kept open to read containers (workers=0)
            writer = out.finish(complete)
    if stop.is_set():
        name = signal.Signals(stop.signal_number).name
        raise Interrupted(
            f"stopped by {name} after {writer.committed} committed rows; "
            f"continue with the same command plus --resume",
            stop.signal_number,
        )
    return LoopOutcome(written, clips, failures, writer.committed, writer.nonfinite_rows, complete,
                       time.perf_counter() - started, timings, missing_meta, nonfinite_meta)


def _count_missing(batch: Batch, missing: dict[str, int], nonfinite: dict[str, int]) -> None:
    """Add up the rows of a batch whose --keep / --columns text was not there (stored as "", its
    absence mask set), and those whose NaN or infinite numbers were written as JSON null."""
    for texts in (batch.meta or {}).values():
        for name, text in texts.items():
            if text is None:
                missing[name] = missing.get(name, 0) + 1
            elif getattr(text, "nonfinite", 0):
                nonfinite[name] = nonfinite.get(name, 0) + 1


def _nonfinite_note(rows: int, out_dtype: str) -> list[str]:
    if not rows:
        return []
    hint = " (float16 overflows above 65504: try --out-dtype float32)" if out_dtype == "float16" else ""
    return [f"{rows} images have token values that are not finite (inf or NaN){hint}"]


def _folder_records(unlisted) -> Rows:
    """Failure records (no rows) for folders that could not be listed."""
    return Rows(keys=[], root_index=np.empty(0, np.int32), image_size=np.empty((0, 2), np.int32),
                failed_keys=[u.key for u in unlisted], failed_root_index=[u.root_index for u in unlisted],
                failed_errors=[u.reason for u in unlisted])


def _next_batch(batches) -> Batch | None:
    try:
        return next(batches)
    except StopIteration:
        return None
    except (ConnectionError, EOFError) as err:
        # A worker that dies while handing over a batch's shared memory breaks the connection.
        raise RuntimeError(f"DataLoader worker connection lost ({type(err).__name__}: {err})") from err


def _make_reporter(progress, total: int) -> Callable[[Progress | None], None]:
    """A callable fed Progress after each batch and None at the end."""
    if callable(progress):
        return lambda p: p is not None and progress(p)
    if not progress:
        return lambda p: None
    bar = tqdm(total=total, unit="img", file=sys.stderr)

    def report(p: Progress | None) -> None:
        if p is None:
            bar.close()
            return
        bar.update(p.done - bar.n)
        bar.set_postfix(failed=p.failed)

    return report
