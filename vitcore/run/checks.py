"""Everything about a run that can be checked without torch: the options, the encoder family that
takes --model / --weights (and the options it refuses), the output path, and the inputs (with
--shard, this run's slice). The CLI runs it before importing torch, so a usage error or an output
that will be refused is reported at once; extract() runs it when not given its result."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass

from vitcore.encoders import registry
from vitcore.errors import UsageError, VitExtractError
from vitcore.imaging.video import EXTRA as VIDEO_EXTRA, VIDEO_EXTENSIONS, is_video_name
from vitcore.options import DEFAULT_EXTENSIONS, ComputeOptions, EncoderOptions, ExtractOptions, InputOptions, OutputOptions, parse_extensions
from vitcore.run.shard import ShardRecord, take_shard
from vitcore.inputs.base import Discovery, path_identity
from vitcore.inputs.discover import discover
from vitcore.inputs.parquet import ParquetRow
from vitcore.store.encoding import PLUGIN_FILTERS, load_plugins
from vitcore.store.lock import check_unlocked
from vitcore.inputs.remote import is_url, public_url
from vitcore.store.output import check_output, output_target, read_as_output
from vitcore.store.remote_output import stage
from vitcore.store.resume import (check_known_settings, check_resumable, check_resumable_file, recorded_clips,
                                  recorded_compute_dtype)
from vitcore.run.settings import store_settings


@dataclass
class CheckedRun:
    encoder: EncoderOptions
    inputs: InputOptions
    compute: ComputeOptions
    output_options: OutputOptions
    family: object  # the encoder family (encoders/base.py)
    output: str
    found: Discovery  # this run's inputs (its shard of them)
    shard: ShardRecord | None
    upload_to: str | None = None  # -o URL: ``output`` is its local staging copy, uploaded when the run ends
    videos: int = 0  # video clips among all the inputs (every shard's)


@dataclass
class UnitInputs:
    """One unit of a run cut up by its driver (--engine ray): its slice of the inputs the driver
    listed once, its shard record, and how many of all the inputs are clips (as find_inputs gives)."""

    found: Discovery
    shard: ShardRecord
    videos: int


def check_run(paths=(), output: str = "tokens.h5", options: ExtractOptions | None = None, *, stdin=None,
              unit: UnitInputs | None = None, **overrides) -> CheckedRun:
    """Refuse, in one line, what would make the run fail before any work; what the run will do.
    ``unit``: the inputs are that unit's, not listed again (``options.shard`` names the unit)."""
    opts = dataclasses.replace(options or ExtractOptions(), **overrides)
    if opts.shard is not None:
        if opts.resume and opts.overwrite:
            raise UsageError("--resume and --overwrite contradict each other; choose one")
        # A shard file is an intermediate product of one launch: a rerun continues it.
        opts = dataclasses.replace(opts, resume=not opts.overwrite)
    encoder, inputs, compute, out = opts.parts()
    if encoder.weights is not None and os.path.isdir(encoder.weights):  # a hub cache folder: its snapshot
        encoder = dataclasses.replace(encoder, weights=registry.checkpoint_folder(encoder.weights))
    family = choose_family(encoder, compute)
    if out.compression in PLUGIN_FILTERS:
        load_plugins(out.compression)  # the extra is installed, or one line saying which
    upload_to = None
    if is_url(str(output)):  # written to a local staging copy, uploaded whole at the end
        if opts.shard is not None and unit is None:  # (a Ray unit's part is an object beside the output)
            raise UsageError("--shard (and torchrun) writes part files beside the output: give a local -o, then merge and upload "
                             "the merged file (or use one run per machine with its own object)")
        upload_to = str(output)
        output = stage(upload_to, out.resume, out.overwrite)
    else:
        output = output_target(str(output))
        check_output(output, out.resume, out.overwrite)
    check_unlocked(output)  # another run writing it: said now, not after the model is built
    if family.takes_video and inputs.extensions is None:  # clips are picked up beside the pictures
        inputs = dataclasses.replace(inputs, extensions=DEFAULT_EXTENSIONS + VIDEO_EXTENSIONS)
    found, shard, videos = (unit.found, unit.shard, unit.videos) if unit else find_inputs(paths, inputs, out, stdin)
    refuse_output_among_inputs(output, found, [inputs.files_from, encoder.weights])
    if videos and not family.takes_video:
        raise UsageError(f"{videos} video clip{'s' * (videos != 1)} among the inputs: clips are read by the Qwen-VL "
                         f"families only (--weights a Qwen-VL checkpoint); {family.name} reads pictures")
    recorded = recorded_clips(output) if out.resume and family.takes_video else None
    if recorded is False and videos:
        raise UsageError(f"{output} was made from pictures alone, so clips cannot join it (their video settings are "
                         "not in it): write the clips to another file")
    if recorded:  # a file with clips goes on with its clips' settings, whatever this run's inputs are
        encoder = dataclasses.replace(encoder, videos=True)
    if videos and family.takes_video:
        if importlib.util.find_spec("av") is None:
            raise UsageError(f"{videos} video clip{'s' * (videos != 1)} among the inputs: reading them needs PyAV, "
                             f"which is not installed: {VIDEO_EXTRA} (or --ext to leave them out)")
        encoder = dataclasses.replace(encoder, videos=True)  # the clips' settings go into the file's record
    checked = CheckedRun(encoder, inputs, compute, out, family, output, found, shard, upload_to, videos)
    with output_named(checked):
        check_resume_settings(checked)
    return checked


@contextlib.contextmanager
def output_named(run: CheckedRun):
    """A refusal about an output in object storage names its URL, not the local staging copy."""
    try:
        yield
    except VitExtractError as err:
        if run.upload_to is not None and err.args and isinstance(err.args[0], str):
            err.args = (err.args[0].replace(run.output, public_url(run.upload_to)), *err.args[1:])
        raise


def refuse_output_among_inputs(output: str, found: Discovery, also_read=()) -> None:
    """An existing output that is also an input (-o photos/a.jpg --overwrite, or the file being
    resumed listed as an input), or one of the other files the run reads (``also_read``: the
    --files-from list, the weights file or a file in the checkpoint folder): writing it would
    destroy what is read."""
    if not os.path.exists(output):
        return
    names = {path_identity(output), path_identity(os.path.realpath(output))}
    if names & found.containers or any(source.identity in names for source in found.sources):
        raise UsageError(f"the output {output} is one of this run's inputs; writing it would destroy it: choose "
                         "another -o")
    for read in filter(None, also_read):
        if read == "-" or is_url(read):
            continue
        inside = os.path.isdir(read) and os.path.realpath(output).startswith(os.path.join(os.path.realpath(read), ""))
        if inside or read_as_output(output, [read]) is not None:
            raise UsageError(f"the output {output} is {'in ' if inside else ''}{read}, which this run reads; writing it "
                             "would destroy it: choose another -o")


def check_resume_settings(run: CheckedRun) -> None:
    """--resume of a file made with other settings: refused here, before torch is imported, where
    the family records a run without torch (run() compares again, with the device known). The
    device only decides what --dtype auto and --decode gpu become: a resume with --dtype auto keeps
    the file's compute dtype, and --decode gpu waits for the device."""
    out, compute = run.output_options, run.compute
    if not (out.resume and os.path.isfile(run.output)):
        return
    check_resumable_file(run.output)  # not HDF5, not ours, a virtual merge: whatever the settings
    if run.encoder.decode == "gpu":
        return
    dtype = recorded_compute_dtype(run.output) if compute.dtype == "auto" else compute.dtype
    if dtype is None:
        return  # not a file of ours: run() says why
    containers = run.inputs.containers
    if not run.family.record_without_torch:  # what is known without the record: the rest after torch
        check_known_settings(run.output, {
            "weights": run.family.weights_record(run.encoder).to_json(), "pooling": out.pool, "compute_dtype": dtype,
            "out_dtype": out.out_dtype, "compression": out.compression,
            "shard": run.shard.to_json() if run.shard is not None else "null", "meta": containers.meta_names,
            "image_column": json.dumps(containers.image_column)})
        return
    record = run.family.record(run.encoder, "cpu")
    settings = store_settings(record, out.pool, out.out_dtype, "cpu", dtype,
                              run.shard.to_json() if run.shard is not None else "null", containers.meta_names,
                              containers.image_column, run.found.image_columns, out.compression)
    check_resumable(run.output, settings)


def choose_family(encoder: EncoderOptions, compute: ComputeOptions):
    """The family that takes --model / --weights; it refuses the options it does not take."""
    family = registry.for_run(encoder.model, encoder.weights)
    if compute.compile == "on" and not family.compilable:
        takers = [f.name for f in registry.FAMILIES if f.compilable]
        raise UsageError(f"--compile on works with the {', '.join(takers)} encoders, not {family.name} "
                         "(--compile auto leaves the others eager)")
    if (encoder.fps is not None or encoder.max_frames is not None) and not family.takes_video:
        takers = [f.name for f in registry.FAMILIES if f.takes_video]
        raise UsageError(f"--fps and --max-frames are for video clips, which the {', '.join(takers)} families read; "
                         f"{family.name} reads pictures only")
    family.check(encoder)
    return family


def _check_meta_fits(found: Discovery, containers) -> None:
    """--columns names Parquet columns, --keep a tar sample's or loose file's sidecars: asked of
    inputs that have none, every row would store "" without a word but a count."""
    if not found.sources or not (containers.columns or containers.keep):
        return
    parquet = sum(isinstance(s, ParquetRow) for s in found.sources)
    if containers.columns and not parquet:
        raise UsageError(f"--columns {','.join(containers.columns)}: none of these inputs is a Parquet file; "
                         "a tar sample's or a loose file's sidecar text is --keep")
    if containers.keep and parquet == len(found.sources):
        raise UsageError(f"--keep {','.join(containers.keep)}: these inputs are Parquet files, which have no "
                         "sidecar files; their columns are --columns")


def find_inputs(paths, inputs: InputOptions, out: OutputOptions, stdin) -> tuple[Discovery, ShardRecord | None, int]:
    """The run's inputs in their stable order, with --shard this run's slice of them, and how many
    of all the inputs (every shard's) are video clips: one decision for every shard's record."""
    found = discover(paths, inputs.files_from, inputs.extensions, stdin=stdin, containers=inputs.containers)
    _check_meta_fits(found, inputs.containers)
    videos = sum(1 for source in found.sources if is_video_name(source.key))
    shard = None
    if out.shard is not None:
        if not found.sources:
            raise UsageError(f"no images found in {', '.join(found.roots) or 'the inputs'}")
        found, shard = take_shard(found, *out.shard)
    if not found.sources and not out.resume and shard is None and found.unlisted:
        first = found.unlisted[0]
        raise UsageError(f"no images found: {os.path.join(found.roots[first.root_index], first.key)}: {first.reason}")
    if not found.sources and not out.resume and shard is None and found.empty:
        raise UsageError(f"no images found: {found.empty[0]}")
    if not found.sources and not out.resume and shard is None:  # a shard may be empty (N > inputs)
        clips = sum(n for ext, n in found.passed_over.items() if ext in VIDEO_EXTENSIONS)
        raise UsageError(
            f"no images found in {', '.join(found.roots) or 'the inputs'} "
            f"(looked for {', '.join(parse_extensions(inputs.extensions))}; --ext changes that)"
            + (f"; {clips} video clip{'s' * (clips != 1)} passed over: clips are read by the Qwen-VL families only"
               if clips else "")
        )
    return found, shard, videos
