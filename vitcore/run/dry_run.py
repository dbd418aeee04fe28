"""``vit-extract run … --dry-run``: what a run would read, store and cost, from the inputs' listing,
their image headers and one short calibration batch; the output is never touched.

The projected size comes from a real file: the calibration batch is written with the run's own
writer, schema, dtype and compression to a temporary file (deleted after), whose datasets give the
bytes of a stored chunk (compressed as these images compress) and the fixed overhead; the rest
of the run's rows are added chunk by chunk, as HDF5 allocates them.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import h5py
import torch
from PIL import Image

from vitcore.imaging.decode import pixel_limit
from vitcore.imaging.loader import ImageDataset, collate
from vitcore.imaging.video import clip_info, is_video_name, open_clip
from vitcore.inputs.base import Discovery
from vitcore.inputs.remote import public_url
from vitcore.run.batching import BatchRunner
from vitcore.run.settings import store_settings
from vitcore.run.checks import CheckedRun, check_run
from vitcore.run.notes import counted_notes
from vitcore.run.pipeline import choose_batching, plan_resume
from vitcore.store import Output, StoreWriter, ragged_index_names
from vitcore.store.writer import SPACE_MARGIN, free_bytes
from vitcore.store.h5open import h5_file
from vitcore.store.resume import existing_file_problem, recorded_compute_dtype
from vitcore.system.device import choose_dtype, dtype_name, resolve_device
from vitcore.system.units import shown_size

HEADER_SAMPLE = 2000  # image headers read to count a native-resolution run's tokens (evenly spaced)
CLIP_SAMPLE = 200  # clip headers read likewise (fewer: a WebM or Matroska clip is decoded to count its frames)
CALIBRATION_IMAGES = 8  # decoded and encoded to time the run and measure its stored bytes
CALIBRATION_TRIES = 64  # inputs tried at most to find them (the first ones may not decode)
INDEX_BYTES_PER_CHUNK = 48  # HDF5's chunk index (v1 B-tree) per allocated chunk, measured
STRING_BYTES = 16  # a variable-length string's global-heap object header, beyond its text
KINDS = {"Source": "image files", "TarMember": "tar members", "ParquetRow": "Parquet rows"}


@dataclass
class DryRun:
    output: str
    inputs: dict[str, int]  # kind (image files, tar members, Parquet rows) → inputs this run would read
    to_read: int  # all of them: a real run's rows + failures
    already_done: int  # --resume: inputs the file holds already (rows or failures)
    duplicates_dropped: int
    passed_over: dict[str, int]  # extension → files in folders not taken (clips too, for a picture family), as a run's
    entries_passed_over: dict[str, int]  # kind (inputs.base.ENTRY_KINDS) → entries not taken, as a run's
    passed_over_notes: list[str]  # the same in words, and why (the run's summary says the same)
    encoder: str
    weights: str  # as a run's summary gives them (UNTRAINED for random weights)
    untrained: bool
    device: str
    compute_dtype: str
    out_dtype: str
    compression: str
    tokens_per_image: dict[str, float]  # stored array → tokens per image (a mean where they vary)
    tokens_counted_from: str  # "fixed", or how many image headers were read
    unreadable_headers: int  # of those read: images a run will likely record as failures
    bytes_per_image: float
    projected_bytes: int  # the output file at the end of the run
    calibration_images: int
    calibration_failures: int  # of the inputs tried for the calibration batch: failures in a run too
    decode_seconds_per_image: float  # one worker
    encode_seconds_per_image: float  # the batch on the device, per image
    batch_size: int | None  # as the run would choose; None when nothing is left to read (as a run's summary)
    workers: int | None
    estimated_seconds: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def dry_run(paths=(), output: str = "tokens.h5", options=None, *, stdin=None, checked: CheckedRun | None = None,
            **overrides) -> DryRun:
    """What ``extract(paths, output, options)`` would do, without doing it (see the module)."""
    run = checked or check_run(paths, output, options, stdin=stdin, **overrides)
    encoder_opts, compute, out_opts, found = run.encoder, run.compute, run.output_options, run.found
    device = resolve_device(compute.device)
    record = run.family.record(encoder_opts, device)
    resuming = recorded_compute_dtype(run.output) if out_opts.resume and compute.dtype == "auto" else None
    chosen = choose_dtype(compute.dtype, device, record.width, resuming)
    containers = run.inputs.containers
    settings = store_settings(record, out_opts.pool, out_opts.out_dtype, device, chosen.dtype,
                              run.shard.to_json() if run.shard is not None else "null", containers.meta_names,
                              containers.image_column, found.image_columns, out_opts.compression)
    plan = plan_resume(Output(run.output, out_opts.resume, out_opts.overwrite), found, settings,
                       out_opts.retry_failed)  # reads an existing file; locks and writes nothing
    sources = plan.sources
    with pixel_limit(run.inputs.max_image_pixels):  # a header over the limit is a failure in a run too
        counts, counted_from, unreadable = _token_counts(record, settings, sources)
    report = DryRun(
        output=public_url(run.upload_to) if run.upload_to else run.output, inputs=_by_kind(sources), to_read=len(sources) + len(plan.unlisted),
        already_done=plan.skipped, duplicates_dropped=found.skipped_duplicates,
        passed_over=dict(found.passed_over), entries_passed_over=dict(found.entries_passed_over),
        passed_over_notes=_passed_over(found, len(plan.unlisted), run.family.takes_video), encoder=record.name,
        weights=record.weights.describe(), untrained=record.weights.untrained, device=str(device),
        compute_dtype=dtype_name(chosen.dtype), out_dtype=out_opts.out_dtype, compression=out_opts.compression,
        tokens_per_image=counts, tokens_counted_from=counted_from, unreadable_headers=unreadable,
        bytes_per_image=0.0, projected_bytes=0, calibration_images=0, calibration_failures=0,
        decode_seconds_per_image=0.0,
        encode_seconds_per_image=0.0, batch_size=None, workers=None, estimated_seconds=0.0,
        notes=found.input_notes + list(record.notes),
    )
    if plan.unlisted:
        report.inputs["folders or containers that cannot be read (a failure record each)"] = len(plan.unlisted)
    if out_opts.overwrite and os.path.exists(run.output):
        what = (existing_file_problem(run.output) or (None, "a vit-extract output"))[1]
        report.notes.append(f"{run.output} exists ({what}): the run would replace it (--overwrite)")
    if compute.compile == "on":
        report.notes.append("--compile on: the time estimate leaves out the one-off compilation (tens of seconds)")
    if not sources:
        report.projected_bytes = os.path.getsize(run.output) if os.path.exists(run.output) else 0
        report.notes.append("nothing left to read: the file holds every input already")
        return report
    built = run.family.build(encoder_opts, device, chosen.dtype, record=record)
    report.batch_size, report.workers = choose_batching(compute, built, len(sources))
    calibration = _calibrate(built, settings, device, sources, containers.meta_names, run.inputs.max_image_pixels)
    report.calibration_failures = calibration.failures
    if calibration.rows is None:
        report.notes.append(f"none of the first {calibration.failures} inputs could be decoded "
                            f"({calibration.error}): no size or time estimate; a run records them as failures")
        return report
    rows, decode_s, encode_s = calibration.rows, calibration.decode_s, calibration.encode_s
    report.calibration_images = len(rows.keys)
    report.decode_seconds_per_image, report.encode_seconds_per_image = decode_s, encode_s
    decode_wall = decode_s / max(1, report.workers)  # workers decode side by side
    # A CPU shares its cores between decoding and encoding (work-conserving: the times add); a GPU
    # encodes while the workers decode, so the slower of the two sets the pace.
    per_image = max(encode_s, decode_wall) if device.type == "cuda" else encode_s + decode_wall
    report.estimated_seconds = per_image * len(sources)
    report.projected_bytes, report.bytes_per_image = _projected_size(
        settings, plan, rows, counts, sources, run.output if plan.skipped else None)
    if unreadable:
        report.notes.append(f"{unreadable} of the headers read could not be read: a run will likely "
                            "record those inputs as failures")
    report.notes += filter(None, [_room_note(run.output, report.projected_bytes, run.upload_to is not None)])
    return report


def _room_note(output: str, projected: int, staged: bool) -> str | None:
    """A note when the output's disk has less room than the file would still take (None otherwise):
    a run there stops when the disk fills (its committed rows kept, --resume goes on)."""
    folder = os.path.dirname(os.path.abspath(output))
    free = free_bytes(folder)  # as the writer's own check measures it
    if free is None:
        return None
    growth = projected - (os.path.getsize(output) if os.path.exists(output) else 0)
    if growth + SPACE_MARGIN <= free:  # the writer keeps SPACE_MARGIN free beyond each batch
        return None
    where = f"the local staging folder {folder}" if staged else folder
    return (f"the file would take {shown_size(growth)} more but {where} has {shown_size(free)} free (a run keeps "
            f"{shown_size(SPACE_MARGIN)} of it free for HDF5): a run would stop when the room runs out (the rows "
            "committed until then are kept; make room, then --resume)")


def _by_kind(sources: list) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for source in sources:
        name = "video clips" if is_video_name(source.key) else KINDS.get(type(source).__name__, type(source).__name__)
        kinds[name] = kinds.get(name, 0) + 1
    return kinds


def _passed_over(found: Discovery, unlisted: int, reads_clips: bool) -> list[str]:
    """What a run's summary says it passed over (the same words)."""
    notes = list(found.notes) + counted_notes({}, found.passed_over, found.entries_passed_over, reads_clips=reads_clips)
    if unlisted:
        notes.append(f"{unlisted} folder{'s' * (unlisted != 1)} or container file{'s' * (unlisted != 1)} could not "
                     f"be listed or opened ({found.unlisted[0].reason}); a run records each as a failure")
    return notes


def _token_counts(record, settings, sources) -> tuple[dict[str, float], str, int]:
    """Tokens per input of each stored array: fixed, or (ragged) the mean over headers read evenly
    across the inputs, from the family's own resize rule (pictures) and frame sampling (clips)."""
    fixed = {spec.name: float(spec.shape[0] if len(spec.shape) == 2 else 1) for spec in settings.arrays}
    pictures = [s for s in sources if not is_video_name(s.key)]
    clips = [s for s in sources if is_video_name(s.key)]
    kinds = []  # (inputs of the kind, their mean counts, what was read)
    if settings.ragged and record.token_counts is not None and pictures:
        kinds.append((len(pictures), *_sampled_means(pictures, HEADER_SAMPLE, _picture_counts(record), "image headers")))
    if settings.ragged and record.clip_token_counts is not None and clips:
        kinds.append((len(clips), *_sampled_means(clips, CLIP_SAMPLE, _clip_counts(record), "clip headers")))
    if not kinds:
        return fixed, "fixed", 0
    # Each kind weighs as the rows it will give (its inputs whose headers read), so the mean is a stored row's.
    weights = [n * share for n, _, _, _, share in kinds]
    means = {name: sum(w * kind[1].get(name, fixed[name]) for w, kind in zip(weights, kinds)) / max(sum(weights), 1e-9)
             for name in fixed}
    return means, " and ".join(kind[2] for kind in kinds), sum(kind[3] for kind in kinds)


def _sampled_means(sources, limit: int, count, noun: str) -> tuple[dict[str, float], str, int, float]:
    """The mean of ``count(binary file)`` over up to ``limit`` of ``sources``, evenly spaced: (means,
    what was read, how many could not be read — a broken file, or a size the processor refuses —,
    and the share that could)."""
    step = max(1, len(sources) // limit)
    sample = sources[::step][:limit]
    totals: dict[str, int] = {}
    read = unreadable = 0
    for source in sample:
        try:
            with source.open() as handle:
                counts = count(handle)
        except Exception:  # a failure in a run too
            unreadable += 1
            continue
        read += 1
        for name, n in counts.items():
            totals[name] = totals.get(name, 0) + n
    words = f"{len(sample)} {noun}" + (" (all)" if len(sample) == len(sources) else " (evenly spaced)")
    return {k: v / max(read, 1) for k, v in totals.items()}, words, unreadable, read / len(sample)


def _picture_counts(record):
    def count(handle) -> dict[str, int]:
        with Image.open(handle) as picture:
            width, height = picture.size  # the header alone; orientation does not change the count
        return record.token_counts(width, height)
    return count


def _clip_counts(record):
    def count(handle) -> dict[str, int]:
        with open_clip(handle) as container:  # the header (a WebM or Matroska clip: its frames counted)
            return record.clip_token_counts(clip_info(container))
    return count


@dataclass
class _Calibration:
    rows: object  # the decoded images' Rows as a run writes them; None when none decoded
    decode_s: float = 0.0
    encode_s: float = 0.0
    failures: int = 0
    error: str = ""


def _calibrate(built, settings, device, sources, meta, max_image_pixels: int | None) -> _Calibration:
    """Decode and encode the first inputs that decode (up to CALIBRATION_IMAGES, trying at most
    CALIBRATION_TRIES) as a run would: their rows, and decode and encode seconds per image."""
    dataset = ImageDataset(sources, built.loader, meta, max_image_pixels)
    items, failed, error, decode_s = [], [], "", 0.0
    for i in range(min(len(sources), CALIBRATION_TRIES)):
        tick = time.perf_counter()
        item = dataset[i]  # (index, pixels, size, error, meta)
        spent = time.perf_counter() - tick
        if item[3] is not None:  # written as a failure record, as a run would (its datasets take space)
            failed.append(item)
            error = error or item[3]
            continue
        if items:  # the first decode warms Pillow and the caches up: not timed
            decode_s += spent
        items.append(item)
        if len(items) == CALIBRATION_IMAGES:
            break
    failures = len(failed)
    if not items:
        return _Calibration(None, failures=failures, error=error)
    decode_s /= max(1, len(items) - 1)
    batch = collate(sorted(items + failed, key=lambda item: item[0]))
    runner = BatchRunner(built, settings, device)
    with torch.inference_mode():
        runner(collate(items[:1]), sources)  # first call: kernels chosen, caches warmed
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        rows = runner(batch, sources)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        encode_s = (time.perf_counter() - tick) / len(items)
    return _Calibration(rows, decode_s, encode_s, failures)


def _projected_size(settings, plan, rows, counts: dict[str, float], sources: list, existing: str | None):
    """(bytes of the output at the end of the run, bytes per image) from a calibration file."""
    with tempfile.TemporaryDirectory(prefix="vit-extract-dry-run-") as folder:
        path = os.path.join(folder, "calibration.h5")
        StoreWriter.prepare(path, settings, plan.roots, resuming=False)
        empty = os.path.getsize(path)  # HDF5's own overhead and the attributes: before any row
        writer = StoreWriter.reopen(path, settings)
        writer.append(rows)
        writer.close(True)
        with h5_file(path, "r") as calibration:
            if existing is None:  # a new file: the calibration file, and the rows after its own
                done = len(rows.keys) + len(rows.failed_keys)  # the inputs the calibration tried
                start = os.path.getsize(path)
                before_rows = empty
                grown = _added_bytes(calibration, calibration, settings, counts, len(sources) - done)
            else:  # --resume: the file as it is, and this run's rows after its own
                done = 0
                start = before_rows = os.path.getsize(existing)
                with h5py.File(existing, "r", locking=False) as h5:
                    grown = _added_bytes(h5, calibration, settings, counts, len(sources))
    text = sum(len(s.key.encode()) + STRING_BYTES for s in sources[done:])  # keys in HDF5's global heap
    total = start + grown + text
    return int(total), float((total - before_rows) / max(1, len(sources)))


def _added_bytes(h5: h5py.File, calibration: h5py.File, settings, counts: dict[str, float], more: int) -> float:
    """Bytes the chunked datasets of ``h5`` grow by when ``more`` images follow the rows it holds:
    each chunk HDF5 allocates past those already there, at the size a stored chunk has in the
    calibration file (compressed as its rows compressed)."""
    if more <= 0:
        return 0.0
    flat = {spec.name for spec in settings.arrays if spec.ragged}
    committed = int(h5.attrs["committed"])
    grown = 0.0

    def visit(name, dataset):
        nonlocal grown
        if not isinstance(dataset, h5py.Dataset) or dataset.chunks is None or name.startswith("failed/"):
            return
        if name in flat:  # (Σ tokens, W): grows by the tokens of the images to come
            offsets, sizes = ragged_index_names(name)
            rows_now = int(h5[offsets][committed - 1] + h5[sizes][committed - 1]) if committed else 0
            rows_then = rows_now + counts[name] * more
        else:
            rows_now = committed
            rows_then = rows_now + more
        chunk_rows = dataset.chunks[0]
        new_chunks = math.ceil(rows_then / chunk_rows) - math.ceil(rows_now / chunk_rows)
        if new_chunks > 0 and name in calibration:
            grown += new_chunks * (_chunk_bytes(calibration[name]) + INDEX_BYTES_PER_CHUNK)
    h5.visititems(visit)
    return grown


def _chunk_bytes(dataset: h5py.Dataset) -> float:
    """The bytes a full chunk of ``dataset`` takes on disk: its size, or compressed, the mean bytes
    per stored row times the rows of a chunk (a partly filled chunk compresses its fill, not rows)."""
    chunk_rows = dataset.chunks[0]
    full = chunk_rows * dataset.id.get_type().get_size() * math.prod(dataset.chunks[1:])  # bfloat16: 2, not 4
    if dataset.id.get_create_plist().get_nfilters() == 0:
        return float(full)
    stored = rows = 0
    for i in range(dataset.id.get_num_chunks()):
        info = dataset.id.get_chunk_info(i)
        stored += info.size
        rows += min(chunk_rows, dataset.shape[0] - info.chunk_offset[0])
    return stored / rows * chunk_rows if rows else float(full)
