"""The vit-extract command line: parse options, build a config, call one library function, show the result.

No model or I/O logic lives here. torch is imported inside the commands (through vitcore),
so ``vit-extract --help`` stays instant.

Exit codes: 0 done (failed images are listed, not fatal); 1 fatal error; 2 usage error;
3 --strict and at least one image failed; 130 / 143 stopped by SIGINT / SIGTERM (resumable).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from . import render
from vitcore import __version__
from vitcore.choices import COMPILE_MODES, COMPRESSIONS, DECODE_MODES, DTYPE_CHOICES, OUT_DTYPES, POOLING_MODES, PROCESSOR_BACKENDS, RESIZE_MODES
from vitcore.errors import Interrupted, UsageError, VitExtractError, one_line
from vitcore.options import ExtractOptions, comma_list
from vitcore.run.shard import parse_shard, shard_path
from vitcore.system.units import parse_size

EXIT_STRICT_FAILURES = 3

class _PlainHelp:
    """Help that reads as a person writes it: flags (--help too) with no type after them, arguments
    by their name alone (this Typer otherwise prints <bool> and <list[Path]>)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
            if param.param_type_name == "argument" and hasattr(param, "display_type_rich"):
                param.display_type_rich = lambda ctx: None
        return params


class _Command(_PlainHelp, TyperCommand):
    pass


class _Group(_PlainHelp, TyperGroup):
    pass


app = typer.Typer(
    name="vit-extract",
    cls=_Group,
    help="Extract Vision Transformer visual tokens from image folders into HDF5.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Piped output is not cut to 80 columns: scripts grep it for hashes and paths.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 4096)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _print_version(value: bool) -> None:
    if value:
        out.print(f"vit-extract {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version,
                                          is_eager=True)] = False,
) -> None:
    """Extract Vision Transformer visual tokens from image folders into HDF5."""


def _choice_enum(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum whose members are ``values`` (member name = value), for a Typer choice option."""
    return Enum(name, {value: value for value in values}, type=str, module=__name__)


# The choices come from vitcore.choices (torch-free), the library's own source of truth.
Pool = _choice_enum("Pool", POOLING_MODES)
Resize = _choice_enum("Resize", RESIZE_MODES)
Decode = _choice_enum("Decode", DECODE_MODES)
Processor = _choice_enum("Processor", PROCESSOR_BACKENDS)
Dtype = _choice_enum("Dtype", DTYPE_CHOICES)
OutDtype = _choice_enum("OutDtype", OUT_DTYPES)
Compression = _choice_enum("Compression", COMPRESSIONS)
ProgressMode = _choice_enum("ProgressMode", render.PROGRESS_MODES)
Engine = _choice_enum("Engine", ("local", "ray"))

# An existing output of `run`, as info and similar take it.
def _local_file(value: str) -> Path:
    """A FILE argument read from this machine: an existing file; a URL refused in one line."""
    if "://" in value and not value.startswith("file://"):
        raise typer.BadParameter(f"{_public(value)} is a URL: this command reads a local file; download it first "
                                 "(`vit-extract info` reads a URL as it is)")
    path = Path(value)
    if not path.exists():
        raise typer.BadParameter(f"file '{value}' does not exist.")
    if path.is_dir():
        raise typer.BadParameter(f"file '{value}' is a directory.")
    return path


def _file_or_url(value: str) -> str:
    """info's FILE: a local file (checked as _local_file does), or a URL read in place (object storage)."""
    return value if "://" in value and not value.startswith("file://") else str(_local_file(value))


def _public(value: str) -> str:
    from vitcore.inputs.remote import public_url  # (no fsspec import: a URL's text only)

    return public_url(value)


RunOutput = Annotated[Path, typer.Argument(metavar="FILE", help="An output file of vit-extract run.", parser=_local_file)]

# run's help panels
ENCODER, INPUTS, COMPUTE, OUTPUT, SCALE, DISPLAY = "Encoder", "Inputs", "Compute", "Output", "Scale out", "Display"


SECOND_CTRL_C = "interrupted at once by a second Ctrl-C; the committed rows are safe: rerun with --resume"


def _fail(error: Exception, as_json: bool = False) -> typer.Exit:
    """Report an expected problem in one line (and as JSON on stdout with --json); the exit code."""
    return _report(str(error), getattr(error, "exit_code", 1), as_json, asked=isinstance(error, Interrupted))


def _report(message: str, code: int, as_json: bool, hint: str = "", asked: bool = False) -> typer.Exit:
    """``message`` as one line on stderr (``hint`` after it there), and as JSON on stdout with --json.
    ``asked``: a stop the user asked for (Ctrl-C, SIGTERM) is said plainly, not as an error."""
    message = one_line(message, None)
    label = "[bold yellow]" if asked else "[bold red]error:[/] "
    err.print(f"{label}{escape(message)}{escape(hint)}" + ("[/]" if asked else ""))
    if as_json:
        out.print_json(json.dumps({"error": message, "exit_code": code}))
    return typer.Exit(code)


def _block_numbers(given: list[str] | None) -> tuple[int, ...]:
    """--layer K, repeated or comma-separated (-2,-3), as block numbers."""
    numbers = []
    for text in given or ():
        for part in comma_list(text):
            try:
                numbers.append(int(part))
            except ValueError:
                raise UsageError(f"--layer {part!r} is not a block number: give integers such as -2 or 3,-1") from None
    return tuple(numbers)


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a whole number or 'auto'") from None
    if number < 1:
        raise typer.BadParameter("must be at least 1")
    return number


@app.command(cls=_Command)
def run(
    paths: Annotated[Optional[list[str]], typer.Argument(metavar="PATHS", help="Image files, folders (searched recursively), WebDataset .tar shards and Parquet files, or their URLs (s3://…, gs://…, hf://…: see Beyond one machine in the README); shard ranges like data/{00000..00099}.tar are expanded.", show_default=False)] = None,
    files_from: Annotated[Optional[str], typer.Option(metavar="FILE", help="Read paths from FILE, one per line (- for stdin).", show_default=False, rich_help_panel=INPUTS)] = None,
    ext: Annotated[Optional[list[str]], typer.Option(metavar="LIST", help="Extensions to pick up in folders, comma-separated or repeated. Default: jpg,jpeg,png,webp,bmp,gif,tif,tiff.", show_default=False, rich_help_panel=INPUTS)] = None,
    keep: Annotated[Optional[list[str]], typer.Option(metavar="LIST", help="Tar shards (WebDataset samples) and loose files: also store the sample's files of these extensions (e.g. txt,json, or --keep repeated) as text datasets meta/<ext>, row-aligned.", show_default=False, rich_help_panel=INPUTS)] = None,
    columns: Annotated[Optional[list[str]], typer.Option(metavar="LIST", help="Parquet: also store these columns (e.g. caption,url, or --columns repeated) as text datasets meta/<column>, row-aligned.", show_default=False, rich_help_panel=INPUTS)] = None,
    image_column: Annotated[Optional[str], typer.Option(metavar="NAME", help="Parquet: the column holding the images. Default: the first holding image bytes (a Hugging Face datasets Image, or binary).", show_default=False, rich_help_panel=INPUTS)] = None,
    max_image_pixels: Annotated[Optional[int], typer.Option(metavar="N", help="Pictures over N pixels are failures (Pillow's guard against decompression bombs). Default: Pillow's limit, 89,478,485 (about 89 megapixels); 0: no limit (a 1-gigapixel scan then takes about 3 GB per decoding worker).", min=0, show_default=False, rich_help_panel=INPUTS)] = None,
    decode: Annotated[Optional[Decode], typer.Option(help="draft: decode large JPEGs at a reduced scale (fast); full: exact decode; gpu: JPEGs decoded and resized on the GPU (nvJPEG through torchvision; elsewhere falls back to draft and says so). Default: draft for the seed encoders, full for the checkpoint families (Qwen-VL, SigLIP, CLIP, DINOv2).", show_default=False, rich_help_panel=INPUTS)] = None,
    model: Annotated[Optional[str], typer.Option(metavar="NAME", help="small | base | large, a custom spec like dim=256,depth=4,heads=4, or a checkpoint family (qwen3-vl, qwen2.5-vl, qwen2-vl, siglip, siglip2, clip, dinov2; found from --weights CHECKPOINT_DIR anyway; `vit-extract models` lists them). Default: base, or the encoder stored in --weights.", show_default=False, rich_help_panel=ENCODER)] = None,
    weights: Annotated[Optional[Path], typer.Option(metavar="PATH", help=".safetensors weights (written by init-weights or save_weights), or a transformers checkpoint folder of Qwen2-VL / Qwen2.5-VL / Qwen3-VL, SigLIP / SigLIP2, CLIP or DINOv2 (told by its config.json; the hub cache's snapshot folders work); without it a seed encoder is UNTRAINED (seeded random init).", exists=True, rich_help_panel=ENCODER)] = None,
    seed: Annotated[int, typer.Option(metavar="N", help="Initialisation seed when no --weights are given.", min=0, rich_help_panel=ENCODER)] = 0,
    pool: Annotated[Pool, typer.Option(metavar="MODE", help="none: all tokens (N, T, D); mean / max: one vector per image (N, D); model: the encoder's own pooled embedding (CLIP's projected image embedding, SigLIP's attention-pool head, DINOv2's CLS), what the model was trained to compare.", rich_help_panel=OUTPUT)] = Pool.none,
    project_dim: Annotated[Optional[int], typer.Option(metavar="P", help="Add a projector Linear(D → P) after the final norm (the bridge to a language model).", min=1, show_default=False, rich_help_panel=ENCODER)] = None,
    layer: Annotated[Optional[list[str]], typer.Option("--layer", metavar="K", help="Also store hidden states after block K as layers/K (blocks from 0; repeatable, or comma-separated: -2,-3; -2 = penultimate, transformers' hidden_states[-2], LLaVA's choice).", show_default=False, rich_help_panel=ENCODER)] = None,
    resize: Annotated[Resize, typer.Option(help="squash: straight to the input size; crop: shorter side + centre crop; pad: letterbox.", rich_help_panel=ENCODER)] = Resize.squash,
    resolution: Annotated[str, typer.Option(metavar="native|N", help="Qwen-VL families: native (the checkpoint processor's rule; token count varies) or N (every image N×N, N a multiple of patch × merge: 32 for qwen3-vl, 28 for qwen2-vl and qwen2.5-vl).", rich_help_panel=ENCODER)] = "native",
    processor: Annotated[Optional[Processor], typer.Option(help="Checkpoint families: follow transformers' torchvision image processor (e.g. Qwen2VLImageProcessor, CLIPImageProcessor: what transformers picks when torchvision is installed, and what vLLM uses) or its Pillow one (…ImageProcessorPil: transformers without torchvision). The two resize differently, so tokens differ slightly; match the stack that will use them. Default: torchvision (torchvision itself is not needed).", show_default=False, rich_help_panel=ENCODER)] = None,
    drop_prefix: Annotated[bool, typer.Option("--drop-prefix", help="CLIP, DINOv2: store patch tokens only, without the leading CLS (and register) tokens; LLaVA's select_feature=patch. The file records how many prefix tokens each row has.", rich_help_panel=ENCODER)] = False,
    features: Annotated[Optional[list[str]], typer.Option(metavar="LIST", help="Qwen-VL families: also store last_hidden (before the merger) and, for qwen3-vl, deepstack (the DeepStack features), comma-separated.", show_default=False, rich_help_panel=ENCODER)] = None,
    fps: Annotated[Optional[float], typer.Option(metavar="F", help="Qwen-VL families, video clips: sample F frames per second (as the video processor's fps; Qwen2-VL's processor then samples, where by default it takes every frame). Default: the checkpoint's video processor (Qwen3-VL: 2).", show_default=False, rich_help_panel=ENCODER)] = None,
    max_frames: Annotated[Optional[int], typer.Option(metavar="N", help="Qwen-VL families, video clips: at most N frames per clip (the video processor's max_frames). Default: the checkpoint's (768).", show_default=False, rich_help_panel=ENCODER)] = None,
    batch_size: Annotated[str, typer.Option(metavar="N|auto", help="Images per batch, or auto.", parser=_batch_size, rich_help_panel=COMPUTE)] = "auto",
    workers: Annotated[Optional[int], typer.Option(metavar="N", help="Decoding worker processes (0: decode in the main process). Default: min(8, CPUs). With --engine ray: decoding tasks in flight per encoder actor (0: each actor decodes its own inputs).", min=0, show_default=False, rich_help_panel=COMPUTE)] = None,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto | cpu | cuda | cuda:N.", rich_help_panel=COMPUTE)] = "auto",
    dtype: Annotated[Dtype, typer.Option(help="Compute dtype; auto: on a GPU bfloat16 where the card computes it, on a CPU whichever of float32 and bfloat16 this machine multiplies faster (measured once per machine, torch and encoder width; the summary says why).", rich_help_panel=COMPUTE)] = Dtype.auto,
    compile: Annotated[str, typer.Option("--compile", metavar="auto|on|off", help="torch.compile the seed encoders. auto: where it pays, by measurement (a long run times its own batches eager and compiled and keeps the faster; the times are remembered per machine, torch, encoder, dtype and batch size); on (--compile alone): compile from the first batch (its time is in the summary); off.", rich_help_panel=COMPUTE)] = "auto",
    output: Annotated[str, typer.Option("--output", "-o", metavar="FILE", help="The HDF5 file to write, or an object URL (s3://bucket/out/tokens.h5: written locally, uploaded whole when the run ends).", rich_help_panel=OUTPUT)] = "tokens.h5",
    out_dtype: Annotated[OutDtype, typer.Option(metavar="DTYPE", help="Stored dtype: float16, bfloat16 or float32. float16: half the size of float32, exact to ~3 digits (overflows above 65504); bfloat16: the same size with float32's range, ~2 digits (h5py reads it as float32; vit-extract's readers as ml_dtypes.bfloat16).", rich_help_panel=OUTPUT)] = OutDtype.float16,
    compression: Annotated[Compression, typer.Option(metavar="CODEC", help="none, gzip, lz4 or zstd: compress the stored tokens (after HDF5's byte shuffle). gzip: built into HDF5, every reader has it; lz4 (fast) and zstd (smaller) need hdf5plugin to write and to read (pip install 'vit-extract\\[compression]'; `import hdf5plugin` before h5py reads the file).", rich_help_panel=OUTPUT)] = Compression.none,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted or earlier run into the same file.", rich_help_panel=OUTPUT)] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="With --resume: try the images the file records as failed again (those that fail again are recorded again).", rich_help_panel=OUTPUT)] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.", rich_help_panel=OUTPUT)] = False,
    shard: Annotated[Optional[str], typer.Option(metavar="I/N", help="I/N: process only shard I (0..N-1) of the sorted inputs into its own file (-o tokens.h5 --shard 3/8 writes tokens.shard00003-of-00008.h5; combine with merge). Under torchrun each rank takes its own shard automatically.", show_default=False, rich_help_panel=OUTPUT)] = None,
    engine: Annotated[Engine, typer.Option(metavar="ENGINE", help="local: this process (and its decoding workers); ray: units of at most --unit-size inputs on a Ray cluster, decoded by Ray CPU tasks for an actor per GPU (or --actors on CPUs) holding the encoder, each unit into a part file beside -o (a file, or an object beside an s3:// one), then merged (pip install 'vit-extract\\[ray]'; see Beyond one machine in the README).", rich_help_panel=SCALE)] = Engine.local,
    ray_address: Annotated[Optional[str], typer.Option(metavar="ADDRESS", help="--engine ray: the cluster to join (as ray.init's address, e.g. auto or HOST:6379). Default: the RAY_ADDRESS variable, else a local Ray instance started for the run.", show_default=False, rich_help_panel=SCALE)] = None,
    actors: Annotated[Optional[int], typer.Option(metavar="N", help="--engine ray: encoder actors. Default: one per GPU of the cluster, else 1.", min=1, show_default=False, rich_help_panel=SCALE)] = None,
    unit_size: Annotated[int, typer.Option(metavar="N", help="--engine ray: the most inputs per unit (a part file each; cut where a tar or a Parquet row group ends; a unit lost with its worker is done again).", min=1, rich_help_panel=SCALE)] = 1024,
    progress: Annotated[ProgressMode, typer.Option(help="bar: a live bar; lines: a plain line every --progress-every seconds and at the end (for logs); auto: bar on a terminal, lines elsewhere; none.", rich_help_panel=DISPLAY)] = ProgressMode.auto,
    progress_every: Annotated[float, typer.Option(metavar="SECONDS", help="Seconds between progress lines (--progress lines).", min=0.0, rich_help_panel=DISPLAY)] = 30.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display and no summary.", rich_help_panel=DISPLAY)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout (and nothing else).", rich_help_panel=DISPLAY)] = False,
    strict: Annotated[bool, typer.Option("--strict", help=f"Exit {EXIT_STRICT_FAILURES} when any image failed.", rich_help_panel=DISPLAY)] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Write nothing: say what would be read (and passed over, and why), the tokens and bytes per image, the projected file size, and a time estimate from one short calibration batch on this machine.", rich_help_panel=DISPLAY)] = False,
) -> None:
    """Extract visual tokens for every image under PATHS into an HDF5 file."""
    from vitcore.run.launch import launched_by_torchrun, rank

    try:
        layers = _block_numbers(layer)
        shown = _Shown.chosen(progress.value, progress_every, quiet)
    except UsageError as error:
        raise _fail(error, as_json)
    options = ExtractOptions(
        model=model, weights=str(weights) if weights else None, seed=seed, pool=pool.value,
        project_dim=project_dim, layers=layers, resize=resize.value,
        decode=decode.value if decode else None, resolution=resolution,
        processor=processor.value if processor else None, drop_prefix=drop_prefix,
        features=tuple(comma_list(features)), fps=fps, max_frames=max_frames,
        batch_size=batch_size, workers=workers, device=device, dtype=dtype.value,
        out_dtype=out_dtype.value, compression=compression.value, files_from=files_from, extensions=ext, keep=keep, columns=columns,
        image_column=image_column, max_image_pixels=max_image_pixels, resume=resume,
        retry_failed=retry_failed, overwrite=overwrite, compile=compile,
    )
    inputs = [str(p) for p in paths or ()]
    if dry_run:
        return _dry_run(inputs, output, options, shard, as_json, unit_size if engine is Engine.ray else None)
    try:
        if engine is Engine.ray:
            if shard or launched_by_torchrun():
                raise UsageError("--engine ray cuts the run into units itself: drop --shard (and torchrun)")
            result, merged = _run_on_ray(inputs, output, options, shown, ray_address, actors, unit_size)
        elif launched_by_torchrun():
            result, merged = _run_launched(inputs, output, options, shard, shown)
            if merged is None:  # ranks other than 0 stay silent
                return
        else:
            result, merged = _run_here(inputs, output, options, shard, shown), None
    except KeyboardInterrupt:  # a second Ctrl-C: the first asked for a clean stop, this one does not wait
        raise _report(SECOND_CTRL_C, 130, as_json, asked=True) from None
    except VitExtractError as error:
        if launched_by_torchrun() and rank() != 0:
            raise typer.Exit(getattr(error, "exit_code", 1))  # rank 0 reports for the launch
        raise _fail(error, as_json)
    if as_json:
        record = result.to_dict()
        if merged is not None:
            record["shards"] = merged.shards
        out.print_json(json.dumps(record))
    elif not quiet:
        render.run_summary(out, result)
        if merged is not None:
            parts = "parts (one per unit)" if engine is Engine.ray else "shards (one per rank)"
            out.print(f"merged {merged.shards} {parts} into {escape(merged.output)}")
    if strict and result.failures:
        raise typer.Exit(EXIT_STRICT_FAILURES)


@dataclasses.dataclass
class _Shown:
    """How a run shows its progress on stderr (--progress, --progress-every, --quiet)."""

    mode: str
    every: float
    enabled: bool

    @classmethod
    def chosen(cls, mode: str, every: float, quiet: bool) -> "_Shown":
        if quiet and mode in ("bar", "lines"):
            raise UsageError(f"--quiet shows no progress, and --progress {mode} asks for it; drop one of them")
        return cls(mode, every, not quiet)

    def display(self, also: bool = True):
        return render.progress_display(err, self.mode, self.every, shown=self.enabled and also)


def _run_launched(inputs: list[str], output: str, options, shard: str | None, shown: _Shown):
    """Under torchrun: this rank's shard, merged by rank 0. (rank 0's summary, the MergeResult or None)."""
    from vitcore.run.distributed import extract_distributed, rank  # torch: not for --help

    if shard:
        raise typer.BadParameter("--shard is chosen by torchrun (one shard per rank); drop it")
    with shown.display(also=rank() == 0) as display:
        outcome = extract_distributed(inputs, str(output), options, progress=display.update)
    return outcome.summary, outcome.merged


def _run_on_ray(inputs: list[str], output: str, options, shown: _Shown, address, actors, unit_size):
    """--engine ray: the units on Ray, merged. (the run's summary, the MergeResult)."""
    from vitcore.run.ray_engine import extract_on_ray  # Ray and torch: only for such a run

    with shown.display() as display:
        outcome = extract_on_ray(inputs, output, options, address=address, actors=actors, unit_size=unit_size,
                                 progress=display.update)
    return outcome.summary, outcome.merged


def _dry_run(inputs: list[str], output: str, options, shard: str | None, as_json: bool, unit_size: int | None) -> None:
    """--dry-run: the plan, the projected size and a time estimate; nothing written. ``unit_size``:
    --engine ray's, whose units are counted (the estimate stays this machine's)."""
    from vitcore.run.checks import check_run  # h5py, numpy: not for --help

    try:
        if shard:
            options.shard = parse_shard(shard)
            output = shard_path(str(output), *options.shard)
        checked = check_run(inputs, str(output), options)
        from vitcore.run.dry_run import dry_run  # torch: only once the run is known to be possible

        report = dry_run(inputs, str(output), options, checked=checked)
        if unit_size is not None:
            from vitcore.run.shard import unit_ranges

            units = len(unit_ranges(checked.found, unit_size))
            report.notes.append(f"--engine ray: {units} unit{'s' * (units != 1)} of at most {unit_size} inputs, each a part "
                                "file beside the output; the time is this machine's alone (a Ray run adds its start-up, "
                                "about 15 s, and runs units on every actor at once)")
    except VitExtractError as error:
        raise _fail(error, as_json)
    if as_json:
        out.print_json(json.dumps(report.to_json()))
    else:
        render.dry_run(out, report)


def _run_here(inputs: list[str], output: str, options, shard: str | None, shown: _Shown):
    """One process: the whole run, or shard I/N of it into its own file."""
    from vitcore.run.checks import check_run  # h5py, numpy: not for --help

    if shard:
        options.shard = parse_shard(shard)
        output = shard_path(str(output), *options.shard)
    with shown.display() as display:
        # Options, output and inputs are checked before torch is loaded: refusals come at once.
        checked = check_run(inputs, str(output), options)
        from vitcore.run.pipeline import StopFlag, extract  # torch: only once the run is known to go ahead

        stop = StopFlag(announce=lambda signal_number: render.stopping(err, signal_number))
        return extract(inputs, str(output), options, progress=display.update, checked=checked, stop=stop)


@app.command(cls=_Command)
def info(
    file: Annotated[str, typer.Argument(metavar="FILE", help="An output file of vit-extract run, or its URL (s3://…, gs://…: read in place, by range requests).", parser=_file_or_url)],
    as_json: Annotated[bool, typer.Option("--json", help="Print everything as JSON on stdout.")] = False,
    failures: Annotated[int, typer.Option(metavar="N", help="How many failed images to list.", min=0)] = 20,
) -> None:
    """Rows, shapes, dtype, encoder, weights and failures of an output file."""
    from vitcore.consumers.tokens import open_tokens  # h5py, numpy: not for --help

    try:
        # info shows broken shards, and a file a run is writing now, as far as it is committed
        with open_tokens(file, check_shards=False, while_written=True) as tokens:
            try:
                summary = tokens.describe(max_failures=failures)
            except (OSError, KeyError, RuntimeError) as error:
                if not tokens.being_written:
                    raise
                raise VitExtractError(f"{file} is open for writing elsewhere and could not be read at this moment "
                                      f"({one_line(error, 120)}); try again") from None
    except VitExtractError as error:
        raise _fail(error, as_json)
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        render.info_table(out, summary)


@app.command(cls=_Command)
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print the presets as JSON on stdout.")] = False,
) -> None:
    """The encoder presets: width, depth, heads, parameters and tokens per image; the other encoder families."""
    from vitcore.encoders.registry import DEFAULT_FAMILY, listing, preset_table  # numpy, h5py: not for --help

    rows = preset_table()
    if as_json:
        out.print_json(json.dumps(rows))
    else:
        render.models_table(out, rows)  # the presets are the default (seed) family's
        for name, summary in listing():
            if name != DEFAULT_FAMILY:
                out.print(f"{escape(name)}: {escape(summary)}")


@app.command("init-weights", cls=_Command)
def init_weights(
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE", help="The .safetensors file to write.", dir_okay=False)],
    model: Annotated[str, typer.Option(metavar="NAME", help="small | base | large, or a custom spec like dim=256,depth=4,heads=4.")] = "base",
    seed: Annotated[int, typer.Option(metavar="N", help="Initialisation seed.", min=0)] = 0,
    project_dim: Annotated[Optional[int], typer.Option(metavar="P", help="Include a projector Linear(D → P).", min=1, show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file.")] = False,
) -> None:
    """Write a seeded (untrained) encoder as .safetensors, its architecture in the metadata."""
    from vitcore.encoders.registry import write_untrained_weights  # torch, safetensors: not for --help
    from vitcore.store.output import check_output

    try:
        check_output(str(output), resume=False, overwrite=overwrite, can_resume=False)
        name = write_untrained_weights(model, seed, project_dim, str(output))
    except VitExtractError as error:
        raise _fail(error)
    out.print(f"wrote {output}: {name} encoder, seed {seed} (untrained)")


@app.command(cls=_Command)
def show(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="An output file of vit-extract run (unpooled).", parser=_local_file)],
    keys: Annotated[Optional[list[str]], typer.Argument(metavar="KEYS", help="Keys (stored paths) to draw; default: the first rows.", show_default=False)] = None,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE", help="The PNG sheet to write.", dir_okay=False)] = Path("sheet.png"),
    first: Annotated[int, typer.Option(metavar="N", help="Without KEYS: draw the first N rows.", min=1)] = 8,
    joint: Annotated[bool, typer.Option("--joint", help="One PCA over all chosen images (comparable colours) instead of one per image.")] = False,
    columns: Annotated[int, typer.Option(metavar="N", help="Pictures per sheet row.", min=1)] = 2,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing sheet.")] = False,
) -> None:
    """Draw each picture beside a PCA colour map of its patch tokens, as one PNG sheet."""
    try:
        output = _check_sheet(output, overwrite, [file])
    except VitExtractError as error:
        raise _fail(error)
    from vitcore.consumers.visualize import token_sheet  # h5py, numpy, Pillow: not for --help

    try:
        _refuse_an_original(output, file)
        image, chosen = token_sheet(str(file), keys, first, joint, columns)
        _save_png(image, output)
    except VitExtractError as error:
        raise _fail(error)
    out.print(f"wrote {output}: {len(chosen)} image{'s' * (len(chosen) != 1)}, {image.width}×{image.height} px")


# The kinds of vitcore.consumers.index.KINDS (named here: importing it would load h5py and numpy for --help).
IndexKind = _choice_enum("IndexKind", ("auto", "flat", "hnsw", "ivf", "ivfpq"))


def _size(value: str) -> int:
    """--max-index-memory: 2GB (10^9), 512MiB (2^20), 1.5G (2^30), or bytes."""
    try:
        return parse_size(value)
    except UsageError as error:
        raise typer.BadParameter(str(error)) from None


@app.command("index", cls=_Command)
def index_command(
    file: RunOutput,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="PATH", help="The faiss index to write; its sidecar (the file's identity, the tuned parameters, each row's key) goes beside it as PATH.json. Name it after the file (out.h5 → out.faiss) and `similar` uses it by itself.", dir_okay=False)],
    kind: Annotated[IndexKind, typer.Option(help="flat: exact; hnsw: a graph over the vectors; ivf: inverted lists of the vectors; ivfpq: inverted lists of compressed (product-quantised) codes. auto: flat up to 100,000 rows, else hnsw, ivf or ivfpq, whichever fits --max-index-memory.")] = IndexKind.auto,
    max_index_memory: Annotated[Optional[str], typer.Option(metavar="SIZE", help="The most memory the index may take, e.g. 2GB or 512MiB: auto chooses the kind by it, and sizes ivfpq's codes to it. Default: no limit.", parser=_size, show_default=False)] = None,
    k: Annotated[int, typer.Option("-k", metavar="K", help="The neighbours the recall is measured and tuned for (recall@K).", min=1)] = 10,
    target_recall: Annotated[float, typer.Option(metavar="R", help="Raise the search parameter (nprobe, efSearch) until recall@K on a sample of the file's own rows, against exact search, reaches R (or the parameter's ceiling).", min=0.01, max=1.0)] = 0.95,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing index (and its sidecar).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Build a vector index (faiss) of the pooled vectors, for fast `similar` on large files."""
    from vitcore.consumers.index import build_index  # faiss, h5py, numpy: not for --help

    try:
        report = build_index(str(file), str(output), kind=kind.value, max_memory=max_index_memory, k=k,
                             target_recall=target_recall, overwrite=overwrite,
                             progress=None if as_json else (lambda line: err.print(escape(line))))
    except VitExtractError as error:
        raise _fail(error, as_json)
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
    else:
        render.index_summary(out, report)


@app.command(cls=_Command)
def similar(
    file: RunOutput,
    query: Annotated[str, typer.Argument(metavar="QUERY", help="A key in the file, or an image file (encoded with the file's settings).")],
    k: Annotated[int, typer.Option("-k", metavar="K", help="How many neighbours.", min=1)] = 10,
    index: Annotated[Optional[Path], typer.Option(metavar="PATH", help="Search through this index (vit-extract index), refused if the file changed since it was built. Default: FILE's own index beside it (out.h5 → out.faiss) when there is one that still matches, else exact search.", exists=True, dir_okay=False, show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the hits as JSON on stdout.")] = False,
    sheet: Annotated[Optional[Path], typer.Option(metavar="PNG", help="Also write a contact sheet of the hits to this PNG.", dir_okay=False, show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --sheet.")] = False,
    max_image_pixels: Annotated[Optional[int], typer.Option(metavar="N", help="A query picture over N pixels is refused, as run's option. Default: Pillow's limit (about 89 megapixels); 0: no limit.", min=0, show_default=False)] = None,
) -> None:
    """The images whose pooled vectors are closest to QUERY (cosine similarity: exact, or through an index)."""
    try:
        sheet = _check_sheet(sheet, overwrite, [file, Path(query), *([index] if index else [])]) if sheet else None
    except VitExtractError as error:
        raise _fail(error, as_json)
    from vitcore.consumers.search import hits_sheet, similar as find_similar  # h5py, numpy: not for --help

    try:
        if sheet is not None:
            _refuse_an_original(sheet, file)
        found = find_similar(str(file), query, k, index=str(index) if index else None, max_image_pixels=max_image_pixels)
        hits, kind = found
        if sheet is not None:
            _save_png(hits_sheet(str(file), hits, query, kind, max_image_pixels=max_image_pixels), sheet)
    except VitExtractError as error:
        raise _fail(error, as_json)
    if as_json:  # the hits as before (a list); how they were searched goes to stderr
        out.print_json(json.dumps([{"rank": h.rank, "key": h.key, "score": h.score} for h in hits]))
        err.print(escape(found.searched.describe()))
    else:
        render.hits_table(out, hits, f"{query} (read as {'a key in the file' if kind == 'key' else 'an image file'})")
        out.print(escape(found.searched.describe()))


@app.command("vllm-cache", cls=_Command)
def vllm_cache_command(
    file: RunOutput,
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="The cache folder a vLLM server reads (ECExampleConnector's shared_storage_path): DIR/UUID/encoder_cache.safetensors per row, and DIR/manifest.jsonl.", file_okay=False)],
    dtype: Annotated[Optional[OutDtype], typer.Option(metavar="DTYPE", help="The dtype the server runs: float32, bfloat16 or float16. Default: the file's stored dtype.", show_default=False)] = None,
    key: Annotated[Optional[list[str]], typer.Option("--key", metavar="KEY", help="Only these rows (repeatable). Default: every row.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Write vLLM's encoder cache from a Qwen-VL file: a vLLM server configured as an encoder-cache consumer then serves prompts about these images and clips without running the vision tower."""
    from vitcore.consumers.vllm_cache import write_vllm_cache  # torch, h5py: not for --help

    try:
        result = write_vllm_cache(str(file), str(folder), dtype=dtype.value if dtype else None, keys=key or None)
    except VitExtractError as error:
        raise _fail(error, as_json)
    record = {"folder": result.folder, "written": result.written, "kept": result.kept, "dtype": result.dtype,
              "manifest": result.manifest, "rows": len(result.entries)}
    if as_json:
        out.print_json(json.dumps(record))
    else:
        rows = len(result.entries)
        out.print(f"{rows} row{'s' * (rows != 1)} → {escape(result.folder)}: {result.written} cache "
                  f"file{'s' * (result.written != 1)} written, {result.kept} already there and kept ({result.dtype}); "
                  f"manifest {escape(result.manifest)}")


@app.command("merge", cls=_Command)
def merge_command(
    shards: Annotated[list[Path], typer.Argument(metavar="SHARDS", help="Shard files written with --shard I/N (all N of them).", exists=True, dir_okay=False)],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE", help="The combined HDF5 file to write.", dir_okay=False)],
    virtual: Annotated[bool, typer.Option("--virtual", help="Write HDF5 virtual datasets over the shards instead of a copy: no second copy of the tokens, but the shards must stay beside it, every read opens one file per shard, and plain h5py reads a shard it cannot open as NaN without an error.")] = False,
    copy: Annotated[bool, typer.Option("--copy", hidden=True, help="A self-contained copy (the default; kept for older scripts).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Combine shard files into one self-contained output that reads like a single run."""
    from vitcore.store.merge import merge  # h5py, numpy: not for --help

    try:
        if copy and virtual:
            raise UsageError("--copy and --virtual contradict each other (a copy is the default)")
        result = merge(str(output), [str(s) for s in shards], virtual=virtual, overwrite=overwrite)
    except VitExtractError as error:
        raise _fail(error, as_json)
    if as_json:
        out.print_json(json.dumps({"output": result.output, "rows": result.rows, "failed": result.failed,
                                   "shards": result.shards, "virtual": result.virtual}))
    else:
        kind = "virtual datasets over the shards" if result.virtual else "a self-contained copy"
        out.print(f"merged {result.shards} shards → {escape(result.output)}: {result.rows} rows, "
                  f"{result.failed} failed ({kind})")


def _refuse_an_original(sheet: Path, file) -> None:
    """A sheet is never the original of one of the file's rows (a picture the user keeps), drawn or
    not, not even with --overwrite: found as ROOT/KEY is, however it is spelled or linked."""
    from vitcore.consumers.tokens import TokenFile

    with TokenFile(str(file)) as f:
        for name in dict.fromkeys((os.path.abspath(sheet), os.path.realpath(sheet))):
            if name in f:
                raise UsageError(f"the sheet {sheet} is the original of a row of {file} ({name}); choose another file")


def _check_sheet(path: Path, overwrite: bool, reading: list[Path]) -> Path:
    """A sheet's output, checked before any work: never a file this command reads (not even with
    --overwrite), an existing file only with --overwrite, through a link its target."""
    from vitcore.store.output import check_output, output_target, read_as_output

    target = Path(output_target(str(path)))
    read = read_as_output(str(target), reading)
    if read is not None:
        raise UsageError(f"the sheet {path} is {read}, which this command reads; choose another file")
    if _sheet_format(target) is None:
        raise UsageError(f"the sheet {path} would be a picture: name it .png (or .jpg, .webp)")
    check_output(str(target), resume=False, overwrite=overwrite, can_resume=False)
    return target


SHEET_FORMATS = {"": "PNG", ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _sheet_format(path: Path) -> str | None:
    """The picture format a sheet's name asks for (none: PNG); None for a name that is no picture's."""
    return SHEET_FORMATS.get(path.suffix.lower())


def _save_png(image, path: Path) -> None:
    """Write a sheet in the format its name says (PNG unless .jpg/.webp); a write problem is one line."""
    kind = _sheet_format(path) or "PNG"
    try:
        image.save(path, format=kind, **({"quality": 92} if kind in ("JPEG", "WEBP") else {}))
    except OSError as error:
        raise VitExtractError(f"cannot write {path}: {error.strerror or error}") from None


def _bare_compile(args: list[str]) -> list[str]:
    """``--compile`` alone, as before it took a value, means ``--compile on``: the next word is an
    input or another option, not the value. A next word that is no path (no such file, no / or .)
    is taken as a value, so ``--compile yes`` is refused as one, not looked for as an input."""
    def bare(i: int) -> bool:
        if i + 1 == len(args):
            return True
        word = args[i + 1]
        if word in COMPILE_MODES:
            return False
        return word.startswith("-") or os.path.exists(word) or "/" in word or "." in word

    return [f"{arg}=on" if arg == "--compile" and bare(i) else arg for i, arg in enumerate(args)]


def main() -> None:
    """The console script. Errors found while parsing the options (a bad choice, an unknown option,
    a missing argument) are one line too, and with --json also a JSON record on stdout."""
    args = _bare_compile(sys.argv[1:])
    try:
        code = app(args=args, standalone_mode=False)
    except Exception as error:
        if _is_click(error, "Abort"):  # a second Ctrl-C: stopped at once
            sys.exit(_report(SECOND_CTRL_C, 130, "--json" in args, asked=True).exit_code)
        if _missing_dependency(error):  # installed without torch (or another dependency): one line, no traceback
            package = error.name.partition(".")[0]
            hint = " (the build for your machine; see the README's Quick start)" if package == "torch" else ""
            sys.exit(_report(f"{package} is not installed in this environment and this command needs it: "
                             f"install it{hint}", 1, "--json" in args).exit_code)
        if _damaged_hdf5(error):  # HDF5 met damage inside a file (its own words, "Can't synchronously read…")
            sys.exit(_report(f"an HDF5 file named on the command line is damaged inside: {one_line(error, 200)}", 1,
                             "--json" in args).exit_code)
        if not _is_click(error, "ClickException"):
            if "--json" in args:  # a fault of vit-extract's own: the traceback below for a report, and a record
                out.print_json(json.dumps({"error": f"internal error: {type(error).__name__}: {one_line(error, 300)}",
                                           "exit_code": 1}))
            raise
        if _is_click(error, "NoArgsIsHelpError"):  # a command alone: its help
            error.show()
            sys.exit(error.exit_code)
        message = error.format_message().replace("Value error, ", "")
        command = getattr(getattr(error, "ctx", None), "command_path", "vit-extract")
        sys.exit(_report(message, error.exit_code, "--json" in args, hint=f" (see {command} --help)").exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _damaged_hdf5(error: BaseException) -> bool:
    """The HDF5 library could not read a file's insides (a file already checked as an output): h5py
    raised OSError, KeyError or RuntimeError from its own code ("Can't synchronously read data (bad
    global heap collection signature)", "Object visitation failed (bad object header version
    number)"). Damage to a file, not a fault of vit-extract's."""
    if not isinstance(error, (OSError, KeyError, RuntimeError)):
        return False
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and "h5py" in frame.tb_frame.f_code.co_filename.replace("\\", "/").split("/")


def _missing_dependency(error: BaseException) -> bool:
    """A package vit-extract depends on could not be imported (not a module of vit-extract's own)."""
    return isinstance(error, ModuleNotFoundError) and bool(error.name) and error.name.partition(".")[0] != "vitcore"


def _is_click(error: BaseException, name: str) -> bool:
    """Whether ``error`` is click's exception ``name`` (Typer may carry its own copy of click)."""
    return any(cls.__name__ == name for cls in type(error).__mro__)


if __name__ == "__main__":
    main()
