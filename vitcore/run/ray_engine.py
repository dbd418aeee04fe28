"""``--engine ray``: a run as units of work on a Ray cluster, in Ray Data's batch-inference pattern
(decoding as CPU tasks, feeding a pool of actors that each hold the encoder).

The driver lists the inputs once and cuts the sorted list into units of at most ``--unit-size``
inputs: contiguous ranges, cut where a tar file or a Parquet row group ends when it fits in a unit
(shard.unit_ranges), each a shard file's range. Each actor builds the encoder
once and runs the units it is given as a local run would, its batches decoded by Ray tasks
(ray_decode.py; ``--workers 0``: in the actor), each unit into its part file beside the output
(``out.shard00003-of-00100.h5``, or an object beside an ``-o s3://…`` object); the driver then
merges the parts into the one output. The units report their batches to a small actor
(ProgressBoard), so the driver's progress moves inside a unit.

A part is a shard file, with all a shard records (its range, the hash of the whole input list, its
committed counter), so "every row exactly once" is what shards already guarantee:
- an actor (or its node) that dies mid-unit is restarted by Ray and the unit tried again; the part
  resumes from its committed rows, so no row is written twice and none is lost; a decoding task
  whose worker dies is run again (decoding has no side effects);
- merge refuses a gap, an overlap or an input twice, and mismatched settings;
- a driver killed outright leaves its parts: the same command with ``--resume`` skips the complete
  ones, resumes the others and merges, giving the uninterrupted run's file.

Ray is an extra (``pip install 'vit-extract[ray]'``), imported only here and in ray_decode.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import pickle
import re
import signal
import sys
import threading
import time

from vitcore.errors import Interrupted, UsageError, VitExtractError, one_line
from vitcore.inputs.remote import filesystem, is_url, public_url
from vitcore.run.checks import UnitInputs, check_run, output_named
from vitcore.run.distributed import _combined
from vitcore.run.shard import shard_path, take_range, unit_ranges
from vitcore.store.resume import finished_shard

DEFAULT_UNIT_SIZE = 1024  # inputs per unit: large enough that a unit's start (a part file, workers) is noise


@dataclasses.dataclass
class RayOutcome:
    summary: object  # an ExtractResult for the whole run (output = the merged file)
    merged: object  # the MergeResult
    units: int
    units_done_before: int  # complete parts found and kept (--resume after a stop)


@dataclasses.dataclass
class UnitsProgress:
    """What the driver knows after each unit: passed to the progress callback."""

    units_done: int
    units: int
    done: int  # inputs of the finished units
    total: int
    failed: int
    elapsed: float
    noun: str = "images"


def _ray():
    # Ray's own C++ warnings (no route to 8.8.8.8 on a cluster without internet, a note on how actors
    # restart) would drown the run's progress; they stay in Ray's log files (/tmp/ray/session_*/logs).
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    # Ray starts a local instance when one of its calls finds none: after a stop has shut Ray down,
    # Ray Data's threads would start a second one (and wait on it) on their way out.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    try:
        import ray
        import ray.data  # noqa: F401  (the batch-inference pattern)
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'vit-extract[ray]'") from None
    return ray


def extract_on_ray(paths, output: str, options, *, address: str | None = None, actors: int | None = None,
                   unit_size: int = DEFAULT_UNIT_SIZE, progress=None, stdin=None) -> RayOutcome:
    """Run ``extract(paths, output, options)`` as units on Ray (see the module), then merge."""
    if unit_size < 1:
        raise UsageError(f"--unit-size must be at least 1, got {unit_size}")
    if options.shard is not None:
        raise UsageError("--shard cuts a run by hand; --engine ray cuts it into units itself: drop --shard")
    whole = check_run(paths, output, options, stdin=stdin)  # refusals before Ray starts; the inputs listed once
    total = len(whole.found.sources)
    ranges = unit_ranges(whole.found, unit_size)  # at tar and row-group boundaries where they fit
    count = len(ranges)
    earlier = _earlier_cuts(str(output), count, unit_size, options.resume, whole.found)
    units, kept, kept_inputs = [], 0, 0
    for index, (start, stop) in enumerate(ranges):
        unit = UnitInputs(*take_range(whole.found, index, count, start, stop), whole.videos)
        part = shard_path(str(output), index, count)  # beside the output: a file, or an object beside the object
        if not options.overwrite and (whole.upload_to is not None or os.path.exists(part)):
            # An earlier run's part: kept if complete, else resumed; refused if made with other settings.
            checked = check_run((), part, dataclasses.replace(options, shard=(index, count)), unit=unit)
            if finished_shard(checked.output) == json.loads(unit.shard.to_json()):
                kept += 1
                kept_inputs += len(unit.found.sources)
                continue
        units.append({"unit": index, "part": part, "work": pickle.dumps(unit)})
    ray = _ray()
    started = time.perf_counter()
    results, dtype, shape = _run_units(ray, units, options, address, actors, progress, count, (kept, kept_inputs), total,
                                       started)
    parts = [shard_path(str(output), index, count) for index in range(count)]
    with output_named(whole):
        merged, summary = _merged(whole, parts, options, lambda merged: _combined(results, merged) if results
                                  else _nothing_to_do(whole, merged, total))
    if results:  # the complete parts kept count as inputs skipped, their failures as earlier ones
        summary = dataclasses.replace(summary, found=total, skipped=summary.skipped + kept_inputs,
                                      failed_earlier=max(0, merged.failed - len(summary.failures)))
    summary = dataclasses.replace(summary, seconds=time.perf_counter() - started)
    if options.dtype == "auto" and dtype is not None:
        summary.dtype_reason = f"{dtype}: decided once, on a Ray worker, for every unit"
    summary.images_per_second = summary.written / summary.seconds if summary.seconds > 0 else 0.0
    if shape is not None:
        summary.decoding = shape.describe(summary.workers)
    summary.warnings += earlier
    return RayOutcome(summary, merged, count, kept)


def _earlier_cuts(output: str, count: int, unit_size: int, resume: bool, found) -> list[str]:
    """Parts beside the output from a run cut into another number of units (another --unit-size):
    never merged with this run's. --resume with only those refuses (it would do everything again); other
    runs leave them and say so."""
    stem, ext = os.path.splitext(output)
    pattern = f"{stem}.shard[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]{ext or '.h5'}"
    if is_url(output):
        fs, path = filesystem(output)
        parts = [output[: len(output) - len(path)] + name
                 for name in fs.glob(path.rsplit("/", 1)[0] + "/" + pattern.rsplit("/", 1)[1])]
    else:
        parts = glob.glob(glob.escape(stem) + pattern[len(stem):])
    cuts: dict[int, int] = {}
    for name in parts:
        cut = int(name[-len("00000" + (ext or ".h5")):-len(ext or ".h5")])
        cuts[cut] = cuts.get(cut, 0) + 1
    if not set(cuts) - {count}:
        return []
    other = max(set(cuts) - {count}, key=cuts.get)
    if resume and count not in cuts:
        earlier = _unit_size_of([name for name in parts if name.endswith(f"-of-{other:05d}{ext or '.h5'}")], found)
        again = f"--unit-size {earlier}" if earlier else "that run's --unit-size"
        raise UsageError(f"the parts beside {public_url(output)} were cut into {other} units by an earlier run; this run "
                         f"cuts {count} units of at most {unit_size} inputs: rerun with {again} to resume them, or "
                         "--overwrite to start again")
    return [f"{sum(n for c, n in cuts.items() if c != count)} part files of an earlier run cut into other units (such as "
            f"-of-{other:05d}) are beside the output; this run did not use them: remove them when no longer wanted"]


def _unit_size_of(parts: list[str], found) -> int | None:
    """The --unit-size that cuts these inputs into the ranges these parts record (None: none found):
    the longest part's length, when it gives them all."""
    from vitcore.store.resume import recorded_shard

    records = [r for r in map(recorded_shard, sorted(parts)[:64]) if r]
    if not records:
        return None
    size = max(r["stop"] - r["start"] for r in records)
    cut = set(unit_ranges(found, size))
    return size if all((r["start"], r["stop"]) in cut for r in records) else None


def _merged(whole, parts: list[str], options, summarize):
    """The parts merged into the output, and ``summarize(merged)`` of the merged file. Parts in object
    storage are fetched to the staging folder first (removed from it after), the merged file read for
    the summary, then uploaded whole."""
    from vitcore.store.merge import merge
    from vitcore.store.remote_output import discard, fetched, upload

    if whole.upload_to is None:
        merged = merge(whole.output, parts, overwrite=options.overwrite or options.resume)
        return merged, summarize(merged)
    local = [fetched(part) for part in parts]
    try:
        merged = merge(whole.output, local, overwrite=True,  # the staged copy: the object is checked already
                       recorded_as={copy: public_url(part) for copy, part in zip(local, parts)})
        summary = summarize(merged)
        upload(whole.output, whole.upload_to, complete=True)
    finally:
        for path in local:
            discard(path)
    url = public_url(whole.upload_to)
    return dataclasses.replace(merged, output=url), dataclasses.replace(summary, output=url)


def _run_units(ray, units: list[dict], options, address, actors, progress, count, kept, total, started):
    """The units through Ray Data's actor pool: (each unit's ExtractResult, as the units finish; the
    compute dtype they ran in)."""
    if not units:
        return [], None, None
    import ray.data

    # The run's own progress and summary say what matters; a failure is said once, in one line
    # (_ray_failure), not also as Ray Data's logged stack traces.
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    wanted = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    if not ray.is_initialized():
        with _stderr_kept_back():
            ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the run's own progress instead
    context.print_on_execution_start = False
    cpus = max(1.0, float(ray.available_resources().get("CPU", 1)))
    gpus = float(ray.available_resources().get("GPU", 0))
    wants_gpu = gpus >= 1 and options.device in ("auto", "cuda")
    pool = actors or (int(gpus) if wants_gpu else 1)
    shape = _pool_shape(cpus, pool, wants_gpu, decode_in_tasks=options.workers != 0)
    # Ray Data's actor pools restart an actor that dies and try its unit again (max_restarts and
    # max_task_retries are -1 by default): the unit's part resumes from its committed rows.
    options = _pinned_dtype(ray, options, shape.actor, units)
    board = ray.remote(ProgressBoard).options(num_cpus=0).remote() if progress else None
    dataset = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        UnitEncoder, fn_constructor_kwargs={"options": options, "shape": shape, "board": board}, batch_size=1,
        # One unit at a time per actor: else the first actor up takes the next units too (Ray Data lets
        # an actor hold several) while the others are still starting, and runs them one after another.
        compute=ray.data.ActorPoolStrategy(size=pool, max_tasks_in_flight_per_actor=1), **shape.actor)
    stream = _UnitStream(dataset)
    with _stop_on_signals(wanted):  # Ray's own SIGTERM handler aborts the driver with a stack dump
        try:
            while not stream.over.wait(0.5):  # (a signal's handler runs in this, the main, thread)
                if progress:
                    progress(_progress(ray, board, stream, count, kept, total, started))
            if stream.error is not None:
                raise _ray_failure(stream.error) from None
            if progress:
                progress(_progress(ray, board, stream, count, kept, total, started))
        except _Stopped as stopped:
            # Ray Data's threads end with errors of their own once Ray is shut down: not the run's news.
            threading.excepthook = lambda args: None
            logging.getLogger("ray.data").setLevel(logging.CRITICAL)
            ray.shutdown()  # the actors end; a unit in flight keeps its committed rows in its part
            stream.over.wait(5)  # the gathering thread sees the end (not left to the interpreter's exit)
            name = signal.Signals(stopped.signal_number).name
            raise Interrupted(f"stopped by {name} after {len(stream.finished) + kept[0]} of {count} units; their parts "
                              "and the committed rows of the others are kept: rerun the same command with --resume",
                              stopped.signal_number) from None
    results = list(stream.finished.values())
    return results, options.dtype, shape


_RAISED = re.compile(r"^\s*((?:\w+\.)*\w*(?:Error|Exception)): (.*)$")  # a traceback's last line: "TypeError: …"


def _ray_failure(err: BaseException) -> VitExtractError:
    """A unit or an actor that failed (not died: Ray retries those) → one line: the error raised in
    our code, not Ray's wrapping of it (Ray carries it as text, each process's traceback included)."""
    lines = [m.groups() for m in map(_RAISED.match, str(err).splitlines()) if m]
    ours = [(kind, text) for kind, text in lines if not kind.startswith("ray.") and kind not in _RAY_WRAPPERS]
    if not ours:
        return VitExtractError(f"the Ray run failed: {type(err).__name__}: {one_line(err, 300)}")
    kind, text = ours[-1]
    if kind == "RuntimeError" and text.startswith("unit "):  # a usage problem a unit met (UnitEncoder)
        return VitExtractError(one_line(text, 500))
    if type(err).__name__ == "ActorDiedError" or "__init__" in str(err).splitlines()[0]:
        return VitExtractError(f"an encoder actor could not start: {kind}: {one_line(text, 300)}")
    return VitExtractError(f"a unit failed on Ray: {kind}: {one_line(text, 300)}")


_RAY_WRAPPERS = {"UserCodeException", "RayTaskError", "ActorDiedError", "RaySystemError", "SystemException"}


class _UnitStream:
    """The units' results as Ray Data hands them over, gathered in a thread: the main thread stays free
    to show progress between units and to take a signal."""

    def __init__(self, dataset):
        self.finished: dict = {}  # unit number → its ExtractResult, as the units finish
        self.error: BaseException | None = None
        self.over = threading.Event()
        threading.Thread(target=self._gather, args=(dataset,), daemon=True).start()

    def _gather(self, dataset) -> None:
        try:
            for row in dataset.iter_rows():
                self.finished[int(row["unit"])] = pickle.loads(row["result"])
        except BaseException as err:  # raised again in the main thread
            self.error = err
        finally:
            self.over.set()


class ProgressBoard:
    """A Ray actor the units report to after each batch (inputs done, failed, by unit), so the driver's
    progress moves inside a unit too. Made a Ray actor class where it is used (Ray is an extra)."""

    def __init__(self):
        self.units: dict[int, tuple[int, int]] = {}

    def put(self, unit: int, done: int, failed: int) -> None:
        self.units[unit] = (done, failed)

    def read(self) -> dict[int, tuple[int, int]]:
        return self.units


def _progress(ray, board, stream: _UnitStream, count: int, kept: tuple[int, int], total: int, started: float):
    """What the driver knows now: the finished units' results, and for the others what they reported."""
    finished = dict(stream.finished)  # (one look: the gathering thread adds to it)
    results = list(finished.values())
    try:
        reported = ray.get(board.read.remote(), timeout=5)
    except Exception:  # the board is only for the display: an answer late or lost shows less
        reported = {}
    done = kept[1] + sum(r.found for r in results)
    failed = sum(len(r.failures) for r in results)
    for unit, (unit_done, unit_failed) in reported.items():
        if unit not in finished:
            done += unit_done
            failed += unit_failed
    return UnitsProgress(len(results) + kept[0], count, min(done, total), total, failed, time.perf_counter() - started)


@dataclasses.dataclass
class PoolShape:
    """What each encoder actor asks Ray for, the threads its encoder computes with, and the CPUs of
    each decoding task (``task_cpus`` None: the actor decodes in its own worker processes)."""

    actors: int
    actor: dict
    threads: int | None  # None: as the device has it (a GPU actor)
    task_cpus: float | None

    def describe(self, workers: int | None) -> str:
        actors = f"{self.actors} encoder actor{'s' * (self.actors != 1)}"
        if not self.task_cpus:
            return f"{actors}, each decoding its own inputs (--workers 0)"
        return f"{actors}, each fed by {workers} Ray decoding task{'s' * (workers != 1)} at a time"


def _pool_shape(cpus: float, pool: int, wants_gpu: bool, decode_in_tasks: bool) -> PoolShape:
    """One actor per GPU, decoding in CPU tasks beside them. On CPUs only, the actors and the decoding
    tasks share the cores (as a local run's encoder and decoding workers do): an actor, and a task,
    asks for at most one CPU and half the actor's share, so that decoding tasks can always be
    scheduled, and the actor computes with its whole share of the cores."""
    share = cpus / pool
    if wants_gpu:
        return PoolShape(pool, {"num_gpus": 1}, None, 1.0 if decode_in_tasks else None)
    if not decode_in_tasks:  # --workers 0: each actor decodes itself, on all of its share
        return PoolShape(pool, {"num_cpus": max(1.0, float(int(share)))}, max(1, int(share)), None)
    # Tasks ask for what an actor asks: a node that holds an actor has room for a task beside it
    # (two nodes of one CPU, an actor each: a task of one CPU would fit on neither).
    actor_cpus = min(1.0, share / 2)
    return PoolShape(pool, {"num_cpus": actor_cpus}, max(1, int(share)), actor_cpus)


@contextlib.contextmanager
def _stderr_kept_back():
    """Ray's start-up writes C++ log lines straight to the process's stderr (a machine without a route
    to the internet gets a warning that it falls back to the host name); kept back unless it fails,
    when they are the failure's words."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            caught.seek(0)
            sys.stderr.write(caught.read().decode(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class _Stopped(BaseException):  # not an Exception: Ray Data logs those as its own internal errors
    def __init__(self, signal_number: int):
        super().__init__(signal_number)
        self.signal_number = signal_number


@contextlib.contextmanager
def _stop_on_signals(signals: list):
    """SIGINT / SIGTERM end the wait for the next unit (not ignored ones: a job started in the
    background of a script ignores SIGINT, and keeps doing so)."""
    def handler(number, frame):
        raise _Stopped(number)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _pinned_dtype(ray, options, per_actor: dict, units: list[dict]):
    """--dtype auto decided once, on an actor's kind of machine, for every unit: parts computed in
    different dtypes (nodes that differ) could not be merged. A part being resumed keeps its own."""
    if options.dtype != "auto":
        return options
    from vitcore.store.resume import recorded_compute_dtype

    recorded = next(filter(None, (recorded_compute_dtype(u["part"]) for u in units if os.path.exists(u["part"]))), None)
    decided = ray.get(ray.remote(**per_actor)(_auto_dtype).remote(options, recorded))
    return dataclasses.replace(options, dtype=decided)


def _auto_dtype(options, recorded: str | None) -> str:
    """On a worker: the dtype --dtype auto chooses there for this run's encoder."""
    from vitcore.run.checks import choose_family
    from vitcore.system.device import choose_dtype, dtype_name, resolve_device

    encoder, _, compute, _ = options.parts()
    device = resolve_device(compute.device)
    width = choose_family(encoder, compute).record(encoder, device).width
    return dtype_name(choose_dtype("auto", device, width, recorded).dtype)


class UnitEncoder:
    """A Ray actor: holds the encoder (built by its first unit) and runs unit after unit."""

    def __init__(self, options, shape: PoolShape, board=None):
        from vitcore.run.ray_decode import RayBatches

        self.options = options
        self.encoders: dict = {}  # the built encoder, kept for the next unit
        self.board = board  # a ProgressBoard actor, when the driver shows progress
        self.make_batches = RayBatches(shape.task_cpus) if shape.task_cpus else None
        if shape.threads:  # Ray sets the thread count from the CPUs the actor asked for, not its share
            import torch

            torch.set_num_threads(min(shape.threads, len(os.sched_getaffinity(0))))

    def __call__(self, batch: dict) -> dict:
        from vitcore.run.pipeline import extract

        out = []
        for index, part, work in zip(batch["unit"], batch["part"], batch["work"]):
            unit: UnitInputs = pickle.loads(work)
            options = dataclasses.replace(self.options, shard=(unit.shard.index, unit.shard.count))
            try:
                checked = check_run((), str(part), options, unit=unit)
                progress = self._reporter(int(index)) if self.board is not None else False
                out.append(pickle.dumps(extract(checked=checked, encoders=self.encoders, make_batches=self.make_batches,
                                                progress=progress)))
            except VitExtractError as err:  # a usage problem is the same on every try: the run stops
                raise RuntimeError(f"unit {index}: {err}") from None
        return {"result": out, "unit": batch["unit"]}

    def _reporter(self, unit: int):
        def report(p) -> None:  # after each batch: not waited for
            self.board.put.remote(unit, p.done, p.failed)
        return report


def _nothing_to_do(whole, merged, total: int):
    """The summary when every part was complete already (a --resume after a stop at the merge): what
    the merged file says of itself."""
    from vitcore.run.pipeline import ExtractResult
    from vitcore.store.reader import StoredTokens
    from vitcore.store.schema import describe_weights

    with StoredTokens(merged.output) as f:
        s = f.describe()
    return ExtractResult(output=merged.output, found=total, skipped=total, written=0, rows=merged.rows, failures=[],
                         seconds=0.0, images_per_second=0.0, device="ray", compute_dtype=s["compute_dtype"],
                         out_dtype=s["out_dtype"], encoder=whole.family.record(whole.encoder, "cpu").name,
                         token_shape=tuple(s["token_shape"]), weights=describe_weights(s["weights"]),
                         untrained=bool(s["untrained"]), complete=True, failed_earlier=s["failed"])
