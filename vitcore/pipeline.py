"""extract(): sources → loader → encoder → store, with progress callbacks.

One direction, no back-and-forth:
    discover inputs → (resume: skip what the file already holds) → DataLoader workers decode
    → main thread: to device, normalise (float32), encode, pool, cast to the stored dtype
    → (CUDA: a copy stream to pinned host buffers, transfer.py)
    → writer thread: HDF5 rows, flush, commit counter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from vitcore import __version__, gpu_decode, host_memory
from vitcore.config import EncoderConfig
from vitcore.device import OUT_DTYPES, dtype_name, resolve_device, resolve_dtype
from vitcore.errors import Interrupted, UsageError, VitExtractError
from vitcore.loader import Batch, batch_rows, default_workers, make_loader
from vitcore.lock import OutputLock
from vitcore.model import POOLING_MODES, VisionEncoder, pool_tokens, resolve_layer
from vitcore.preprocess import DECODE_MODES, RESIZE_MODES, PreprocessConfig, normalize_on_device
from vitcore.shard import ShardRecord, take_shard
from vitcore.sources import Discovery, discover, file_identity, parse_extensions
from vitcore.store import (
    AsyncWriter,
    Rows,
    StoreSettings,
    StoreWriter,
    check_output,
    check_resumable,
)
from vitcore.transfer import HostCopier
from vitcore.weights import WeightsInfo, build_encoder


@dataclass
class ExtractOptions:
    """Every setting of a run; the CLI fills one from its options."""

    model: str | EncoderConfig | None = None  # preset, custom spec or config; None: base or the weights' own
    weights: str | None = None  # .safetensors written by save_weights / init-weights
    seed: int = 0  # initialisation seed when no weights are given
    pool: str = "none"  # none | mean | max
    project_dim: int | None = None  # projector Linear(D → P)
    layers: tuple[int, ...] = ()  # also store hidden states after these blocks (-2: penultimate)
    resize: str = "squash"  # squash | crop | pad (seed encoders)
    decode: str | None = None  # draft | full; None: draft for the seed encoders, full for qwen3-vl
    resolution: str = "native"  # qwen3-vl: native (the processor's rule) or N (every image N × N)
    features: tuple[str, ...] = ()  # qwen3-vl extras: last_hidden, deepstack
    batch_size: int | str = "auto"
    workers: int | None = None  # None: min(8, CPUs available)
    device: str = "auto"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    out_dtype: str = "float16"  # stored dtype
    files_from: str | None = None  # a file of paths, or "-" for stdin
    extensions: str | tuple[str, ...] | None = None  # None: jpg jpeg png webp bmp gif tif tiff
    resume: bool = False
    retry_failed: bool = False  # with resume: decode the images the file records as failed again
    overwrite: bool = False
    shard: tuple[int, int] | None = None  # (I, N): only inputs [I·T/N, (I+1)·T/N); resumed automatically
    compile: bool = False  # torch.compile the seed encoder (compiled on the first batch; time reported)


@dataclass
class Progress:
    done: int  # inputs handled this run (rows written + failures)
    total: int  # inputs this run has to handle
    failed: int
    elapsed: float  # seconds since the first batch was requested


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
    token_shape: tuple[int, ...]
    weights: str  # human description
    untrained: bool
    complete: bool
    duplicates_dropped: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds waiting on decode / compute / writer
    warnings: list[str] = field(default_factory=list)  # things the user should know (e.g. batch split)

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        record["failures"] = [{"path": k, "error": e} for k, e in self.failures]
        record["token_shape"] = list(self.token_shape)
        return record


class StopFlag:
    """Set by SIGINT / SIGTERM; the loop checks it between batches and stops after a commit."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    def set(self, signal_number: int = signal.SIGINT) -> None:
        self.signal_number = signal_number

    def is_set(self) -> bool:
        return self.signal_number is not None


@contextlib.contextmanager
def stop_on_signals(stop: StopFlag):
    """While extracting: SIGINT/SIGTERM only set the flag (a second SIGINT aborts at once).

    A plain KeyboardInterrupt is not enough: raised inside h5py's weakref callbacks it can be
    swallowed (reference/hdf5-notes.md §2). Only installed from the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _init_worker(_worker_id: int) -> None:
    host_memory.restore_in_child()  # workers give the memory of large images back
    # Ctrl-C, and SIGTERM from timeout/Slurm/systemd, reach the whole process group: the main
    # process decides how to stop and shuts the workers down (they also exit if it dies).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def validate_options(opts: ExtractOptions) -> None:
    checks = (
        ("--pool", opts.pool, POOLING_MODES),
        ("--resize", opts.resize, RESIZE_MODES),
        ("--decode", opts.decode or "draft", DECODE_MODES),
        ("--out-dtype", opts.out_dtype, OUT_DTYPES),
    )
    for flag, value, choices in checks:
        if value not in choices:
            raise UsageError(f"{flag} {value!r} is not one of {', '.join(choices)}")
    if opts.batch_size != "auto" and (not isinstance(opts.batch_size, int) or opts.batch_size < 1):
        raise UsageError(f"--batch-size must be a positive integer or auto, got {opts.batch_size!r}")
    if opts.workers is not None and opts.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {opts.workers}")
    if opts.retry_failed and not opts.resume:
        raise UsageError("--retry-failed goes with --resume: it retries the failures an existing output records")


def auto_batch_size(cfg: EncoderConfig, device: torch.device, dtype: torch.dtype) -> int:
    """CPU: a batch big enough to keep the matmuls efficient. CUDA: what fits in half the free memory."""
    if device.type != "cuda":
        return 16 if dtype == torch.bfloat16 else 8
    free, _ = torch.cuda.mem_get_info(device)
    element = torch.finfo(dtype).bits // 8
    # Peak activation per image: the MLP hidden (4D) plus q, k, v and residual copies, per token.
    per_image = cfg.num_tokens * (int(cfg.mlp_ratio * cfg.dim) + 6 * cfg.dim) * element * 2
    fits = int(free * 0.5 // max(per_image, 1))
    return max(1, min(512, 1 << max(0, fits.bit_length() - 1)))


def _settings(
    encoder: VisionEncoder, info: WeightsInfo, opts: ExtractOptions, prep: PreprocessConfig,
    layers: tuple[int, ...], device: torch.device, dtype: torch.dtype,
) -> StoreSettings:
    cfg = encoder.cfg
    tokens = (cfg.out_dim,) if opts.pool != "none" else (cfg.num_tokens, cfg.out_dim)
    hidden = (cfg.dim,) if opts.pool != "none" else (cfg.num_tokens, cfg.dim)
    return StoreSettings(
        encoder=cfg.to_json(),
        weights=info.to_json(),
        weights_identity=info.identity(),
        preprocessing=prep.to_json(),
        pooling=opts.pool,
        projector=f'{{"dim": {cfg.project_dim}}}' if cfg.project_dim else "null",
        compute_dtype=dtype_name(dtype),
        device=str(device),
        out_dtype=opts.out_dtype,
        token_shape=tokens,
        layer_shape=hidden,
        layers=layers,
        version=__version__,
    )


def _normalise_layers(layers, depth: int) -> tuple[int, ...]:
    """Each distinct K as given (``-1`` and ``23`` are both stored if both are asked for)."""
    out: list[int] = []
    for k in layers:
        try:
            resolve_layer(int(k), depth)
        except IndexError:
            raise UsageError(
                f"--layer {k} is out of range: this encoder has {depth} blocks (0..{depth - 1}, or -{depth}..-1)"
            ) from None
        if int(k) not in out:
            out.append(int(k))
    return tuple(out)


def extract(
    paths=(),
    output: str = "tokens.h5",
    options: ExtractOptions | None = None,
    *,
    progress: bool | Callable[[Progress], None] = False,
    stop: StopFlag | None = None,
    stdin=None,
    **overrides,
) -> ExtractResult:
    """Extract visual tokens for every image under ``paths`` into the HDF5 file ``output``.

    Options come from ``options`` and/or keyword overrides (``extract("photos", "out.h5",
    model="small", pool="mean")``). ``progress=True`` draws a tqdm bar on stderr; a callable
    receives a Progress after every batch. Raises VitExtractError subclasses for problems a
    person can fix; image failures are not errors (they are in the result and the file).
    """
    opts = dataclasses.replace(options or ExtractOptions(), **overrides)
    if opts.model is None and opts.weights and os.path.isfile(os.path.join(opts.weights, "config.json")):
        opts = dataclasses.replace(opts, model="qwen3-vl")  # a checkpoint folder: its vision tower
    if opts.shard is not None:
        if opts.resume and opts.overwrite:
            raise UsageError("--resume and --overwrite contradict each other; choose one")
        # A shard file is an intermediate product of one launch: a rerun continues it.
        opts = dataclasses.replace(opts, resume=not opts.overwrite)
    validate_options(opts)
    if is_qwen3vl(opts.model):
        if opts.compile:
            raise UsageError("--compile works with the seed encoders (small, base, large, custom), not qwen3-vl")
        if opts.decode == "gpu":
            raise UsageError("--decode gpu works with the seed encoders; qwen3-vl decodes on the CPU exactly as "
                             "its processor does (--decode full)")
    output = str(output)
    check_output(output, opts.resume, opts.overwrite)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    found: Discovery = discover(paths, opts.files_from, opts.extensions, stdin=stdin)
    shard = None
    if opts.shard is not None:
        if not found.sources:
            raise UsageError(f"no images found in {', '.join(found.roots) or 'the inputs'}")
        found, shard = take_shard(found, *opts.shard)
    if not found.sources and not opts.resume and shard is None:  # a shard may be empty (N > inputs)
        raise UsageError(
            f"no images found in {', '.join(found.roots) or 'the inputs'} "
            f"(looked for {', '.join(parse_extensions(opts.extensions))}; --ext changes that)"
        )
    with OutputLock(output):  # one run per output, released even if this process is killed
        check_output(output, opts.resume, opts.overwrite)  # again: another run may have made it meanwhile
        return _extract_locked(found, output, opts, device, dtype, progress, stop or StopFlag(), shard)


def _extract_locked(
    found: Discovery, output: str, opts: ExtractOptions, device: torch.device, dtype: torch.dtype,
    progress, stop: StopFlag, shard: ShardRecord | None = None,
) -> ExtractResult:
    notes: list[str] = []  # things the summary must say about how this run was set up
    finish_batch = None  # --decode gpu: decodes a batch's JPEGs on the device
    if is_qwen3vl(opts.model):
        run_batch, settings, prep, info, encoder_name = _build_qwen3vl(opts, device, dtype)
    else:
        encoder, info = build_encoder(
            opts.model, opts.weights, seed=opts.seed, project_dim=opts.project_dim, device=device, dtype=dtype
        )
        layers = _normalise_layers(opts.layers, encoder.cfg.depth)
        prep = PreprocessConfig(image_size=encoder.cfg.image_size, resize=opts.resize, decode=opts.decode or "draft")
        if prep.decode == "gpu":
            reason = gpu_decode.unavailable_reason(device)
            if reason is None:
                finish_batch = gpu_decode.GpuJpegDecoder(prep, device)
            else:  # the file records the decode actually used
                notes.append(f"--decode gpu {reason}: JPEGs were decoded on the CPU (draft) instead")
                prep = dataclasses.replace(prep, decode="draft")
        settings = _settings(encoder, info, opts, prep, layers, device, dtype)
        run_batch = BatchEncoder(encoder, settings, prep, device, dtype, compile=opts.compile)
        encoder_name = encoder.cfg.name
    if shard is not None:
        settings = dataclasses.replace(settings, shard=shard.to_json())

    # Resume: keep the file's roots (row root_index values point into them), skip what it holds.
    roots, sources, skipped = list(found.roots), found.sources, 0
    resuming = opts.resume and os.path.exists(output)
    keep_failures = None  # --retry-failed: the failure records to keep (those of images not retried)
    if resuming:
        state = check_resumable(output, settings)
        roots = state.roots + [r for r in found.roots if r not in state.roots]
        remap = [roots.index(r) for r in found.roots]
        identities = [file_identity(found.roots[s.root_index], s.key) for s in found.sources]
        failed = set(state.failed)
        skip = state.done | failed
        if opts.retry_failed:  # only failures among this run's inputs: the others' records stay
            retried = failed & set(identities)
            skip -= retried
            keep_failures = [i for i, f in enumerate(state.failed) if f not in retried]
        sources = [
            dataclasses.replace(s, root_index=remap[s.root_index])
            for s, identity in zip(found.sources, identities)
            if identity not in skip
        ]
        skipped = len(found.sources) - len(sources)

    if opts.batch_size != "auto":
        batch_size = opts.batch_size
    elif is_qwen3vl(opts.model):
        batch_size = 4 if device.type == "cpu" else 32  # native-resolution images vary widely in size
    else:
        batch_size = auto_batch_size(encoder.cfg, device, dtype)
    workers = default_workers() if opts.workers is None else opts.workers
    workers = min(workers, max(1, len(sources) // batch_size + 1)) if workers else 0
    loader = make_loader(sources, prep, batch_size, workers, pin_memory=device.type == "cuda")
    if workers:
        loader.worker_init_fn = _init_worker

    started = time.perf_counter()
    timings = {"decode_wait": 0.0, "compute": 0.0, "writer_wait": 0.0}
    done = written = 0
    failures: list[tuple[str, str]] = []
    reporter = _make_reporter(progress, len(sources))

    # Created or truncated, and closed, before the fork (see StoreWriter.prepare); from the fork
    # on, only the writer thread writes to the file.
    StoreWriter.prepare(output, settings, roots, resuming, keep_failures)
    # Workers fork when the iterator is created: before the output is opened for writing.
    batches = iter(loader) if sources else iter(())
    writer = async_writer = None
    complete = False
    try:
        reporter(Progress(0, len(sources), 0, 0.0))
        writer = StoreWriter.reopen(output, settings)
        async_writer = AsyncWriter(writer)
        with stop_on_signals(stop), torch.inference_mode():
            while not stop.is_set():
                tick = time.perf_counter()
                batch = _next_batch(batches)
                if batch is None:
                    break
                timings["decode_wait"] += time.perf_counter() - tick
                tick = time.perf_counter()
                if finish_batch is not None:
                    batch = finish_batch(batch, sources)
                rows = run_batch(batch, sources)
                timings["compute"] += time.perf_counter() - tick
                tick = time.perf_counter()
                async_writer.put(rows)
                del rows  # the writer thread holds the batch now; its buffers go when it is written
                timings["writer_wait"] += time.perf_counter() - tick
                written += len(batch.indices)
                failures += [(sources[f.index].key, f.error) for f in batch.failures]
                done += len(batch.indices) + len(batch.failures)
                reporter(Progress(done, len(sources), len(failures), time.perf_counter() - started))
        complete = not stop.is_set()
    except RuntimeError as err:
        # PyTorch raises a dead worker (say, killed by the OOM killer) from its SIGCHLD handler,
        # wherever the main thread happens to be: not only in next(), so it is caught here.
        if "DataLoader worker" not in str(err):
            raise
        raise VitExtractError(
            f"an image-decoding worker process died ({' '.join(str(err).split())[:160]}); the committed "
            "rows are safe: rerun with --resume (and fewer --workers if memory is short)"
        ) from None
    finally:
        with _no_worker_signals():  # cleanup must not be cut short by a dying worker's SIGCHLD
            reporter(None)
            _shut_down(batches)
            del batches
            if async_writer is not None:
                async_writer.close(complete)
            elif writer is not None:
                writer.close(False)
    seconds = time.perf_counter() - started
    if stop.is_set():
        name = signal.Signals(stop.signal_number).name
        raise Interrupted(
            f"stopped by {name} after {writer.committed} committed rows; "
            f"continue with the same command plus --resume",
            stop.signal_number,
        )
    if finish_batch is not None and finish_batch.refused:
        notes.append(f"JPEGs the GPU decoder refused, decoded by Pillow instead: {finish_batch.refused}")
    if getattr(run_batch, "compile_seconds", None):
        timings["compile"] = run_batch.compile_seconds  # part of "compute"
    return ExtractResult(
        output=output,
        found=len(found.sources),
        skipped=skipped,
        written=written,
        rows=writer.committed,
        failures=failures,
        seconds=seconds,
        images_per_second=written / seconds if seconds > 0 else 0.0,
        device=str(device),
        compute_dtype=dtype_name(dtype),
        out_dtype=opts.out_dtype,
        encoder=encoder_name,
        token_shape=settings.token_shape,
        weights=info.describe(),
        untrained=info.untrained,
        complete=complete,
        duplicates_dropped=found.skipped_duplicates,
        timings=timings,
        warnings=notes + run_batch.warnings + _nonfinite_note(writer.nonfinite_rows, opts.out_dtype),
    )


def _nonfinite_note(rows: int, out_dtype: str) -> list[str]:
    if not rows:
        return []
    hint = " (float16 overflows above 65504: try --out-dtype float32)" if out_dtype == "float16" else ""
    return [f"{rows} images have token values that are not finite (inf or NaN){hint}"]


def is_qwen3vl(model) -> bool:
    return isinstance(model, str) and model.strip().lower() == "qwen3-vl"


def _build_qwen3vl(opts: ExtractOptions, device: torch.device, dtype: torch.dtype):
    """The Qwen3-VL vision tower of a checkpoint folder, its worker-side loader and the file settings."""
    from vitcore.qwen3vl import FEATURE_CHOICES, Qwen3VLBatchEncoder, Qwen3VLImageLoader, load_qwen3vl

    if not opts.weights or not os.path.isdir(opts.weights):
        raise UsageError("--model qwen3-vl needs --weights DIR: a local Hugging Face Qwen3-VL checkpoint folder")
    for flag, value in (("--layer", opts.layers), ("--project-dim", opts.project_dim)):
        if value:
            raise UsageError(f"{flag} is for the seed encoders; qwen3-vl stores its merger output (see --features)")
    if opts.resize != "squash":
        raise UsageError("--resize is for the seed encoders; qwen3-vl keeps the aspect ratio (see --resolution)")
    unknown = [f for f in opts.features if f not in FEATURE_CHOICES]
    if unknown:
        raise UsageError(f"--features {','.join(unknown)}: choose from {', '.join(FEATURE_CHOICES)}")
    encoder, prep = load_qwen3vl(opts.weights, device=device, dtype=dtype)
    cfg = encoder.cfg
    if opts.resolution != "native":
        try:
            side = int(opts.resolution)
        except ValueError:
            side = 0
        if side < prep.factor or side % prep.factor:
            raise UsageError(f"--resolution {opts.resolution}: use native or a multiple of {prep.factor}")
        prep = dataclasses.replace(prep, fixed=side)
    loader_cfg = Qwen3VLImageLoader(prep, decode=opts.decode or "full")
    info = WeightsInfo(source="file", path=os.path.abspath(opts.weights), sha256=encoder.weights_sha256)
    pooled, fixed = opts.pool != "none", prep.fixed is not None
    merge = cfg.spatial_merge_size**2
    tokens_per_image = (prep.fixed // prep.patch_size) ** 2 // merge if fixed else 0

    def shape(width: int, per_patch: bool = False) -> tuple[tuple[int, ...], bool]:
        """Per-image stored shape and whether it is ragged."""
        if pooled:
            return (width,), False
        if fixed:
            return (tokens_per_image * (merge if per_patch else 1), width), False
        return (width,), True

    token_shape, ragged = shape(cfg.out_hidden_size)
    features = []
    if "last_hidden" in opts.features:
        features.append(("last_hidden", *shape(cfg.hidden_size, per_patch=True)))
    if "deepstack" in opts.features:
        features += [(f"deepstack_{j}", *shape(cfg.out_hidden_size)) for j in range(len(cfg.deepstack_visual_indexes))]
    preprocessing = json.dumps({**dataclasses.asdict(prep), "decode": loader_cfg.decode,
                                "resolution": opts.resolution, "interpolation": "bicubic (Pillow)"}, sort_keys=True)
    settings = StoreSettings(
        encoder=cfg.to_json(), weights=info.to_json(), weights_identity=info.identity(),
        preprocessing=preprocessing, pooling=opts.pool, projector="null",
        compute_dtype=dtype_name(dtype), device=str(device), out_dtype=opts.out_dtype,
        token_shape=token_shape, layer_shape=token_shape, layers=(), version=__version__,
        ragged=ragged, grid_thw=True, features=tuple(features),
    )
    run_batch = Qwen3VLBatchEncoder(encoder, settings, prep, device, dtype, tuple(opts.features))
    return run_batch, settings, loader_cfg, info, "qwen3-vl"


@contextlib.contextmanager
def _no_worker_signals():
    """PyTorch reports a dead DataLoader worker by raising from its SIGCHLD handler, wherever the
    main thread is; while shutting down and closing the output, that would interrupt the cleanup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)


def _shut_down(batches) -> None:
    """Stop a DataLoader iterator's worker processes now. Dropping the iterator is not enough
    when an exception's traceback still holds a frame that refers to it."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # PyTorch's multi-process iterator
    if shutdown is not None:
        shutdown()


def _next_batch(batches) -> Batch | None:
    try:
        return next(batches)
    except StopIteration:
        return None
    except (ConnectionError, EOFError) as err:
        # A worker that dies while handing over a batch's shared memory breaks the connection.
        raise RuntimeError(f"DataLoader worker connection lost ({type(err).__name__}: {err})") from err


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    )


class BatchEncoder:
    """Batch of uint8 pixels → Rows for the writer, on the device.

    When a batch does not fit in device memory it is split in halves (recursively) and the
    size that fitted is used from then on; one image that does not fit is a clear error.
    """

    def __init__(self, encoder: VisionEncoder, settings: StoreSettings, prep: PreprocessConfig,
                 device: torch.device, dtype: torch.dtype, compile: bool = False):
        self.encoder, self.settings, self.prep = encoder, settings, prep
        self.device, self.dtype = device, dtype
        # torch.compile traces on the first call, for that batch size only (dynamic=False): a later,
        # smaller batch is padded to it rather than compiled again.
        self.features = torch.compile(encoder.forward_features, dynamic=False) if compile else encoder.forward_features
        self.compile_seconds: float | None = None if not compile else 0.0
        self.compiled_batch: int | None = None
        self.max_chunk: int | None = None  # images per forward pass, once memory ran out
        self.to_host = HostCopier(device) if device.type == "cuda" else None
        self.warnings: list[str] = []

    def __call__(self, batch: Batch, sources) -> Rows:
        settings = self.settings
        pool, out_dtype = settings.pooling, settings.out_dtype
        n = len(batch.indices)
        if n:
            pixels = batch.pixels.to(self.device, non_blocking=True)  # (B, S, S, 3) uint8
            x = normalize_on_device(pixels, self.prep.mean, self.prep.std, self.dtype)  # (B, 3, S, S)
            tokens, hidden = self._forward(x)  # (B, N, P), {K: (B, N, D)}
            store_dtype = getattr(torch, out_dtype)
            # Pooling and the mean token are computed in float32 whatever the compute dtype.
            tokens = tokens.float()  # one float32 copy (none in float32) for both
            mean = tokens.mean(dim=1).to(store_dtype) if pool == "none" else None
            out_tokens = pool_tokens(tokens, pool).to(store_dtype)  # (B, N, P) or (B, P)
            out_layers = {k: pool_tokens(h.float(), pool).to(store_dtype) for k, h in hidden.items()}
        else:  # every image of this batch failed: empty rows, failures only
            out_tokens = np.empty((0, *settings.token_shape), out_dtype)
            mean = np.empty((0, settings.token_shape[-1]), out_dtype) if pool == "none" else None
            out_layers = {k: np.empty((0, *settings.layer_shape), out_dtype) for k in settings.layers}
        rows = batch_rows(batch, sources, tokens=out_tokens, mean=mean, layers=out_layers)
        # On a GPU the results go to the host on a copy stream (transfer.py), and this thread goes
        # on to the next batch without waiting. On the CPU they are there already: numpy views.
        return self.to_host(rows) if self.to_host is not None else rows.to_host()

    def _forward_compiled(self, x: torch.Tensor):
        n = x.shape[0]
        if self.compiled_batch is None:  # the first call compiles: time it apart from the rest
            tick = time.perf_counter()
            out = self.features(x, self.settings.layers)
            self.compile_seconds += time.perf_counter() - tick
            self.compiled_batch = n
            return out
        if n >= self.compiled_batch:
            return self.features(x, self.settings.layers)
        padded = torch.cat([x, x.new_zeros((self.compiled_batch - n, *x.shape[1:]))])  # images never mix
        tokens, hidden = self.features(padded, self.settings.layers)
        return tokens[:n], {k: h[:n] for k, h in hidden.items()}

    def _forward(self, x: torch.Tensor):
        if self.max_chunk is not None and x.shape[0] > self.max_chunk:
            parts = [self._forward(part) for part in x.split(self.max_chunk)]
            return _concat(parts)
        try:
            if self.compile_seconds is None:
                return self.features(x, self.settings.layers)
            return self._forward_compiled(x)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_out_of_memory(err):
                raise
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if x.shape[0] == 1:
            raise VitExtractError(
                f"out of {self.device} memory for a single image; use a smaller --model, "
                "--dtype bfloat16, or another --device"
            ) from None
        self.max_chunk = x.shape[0] // 2
        self.compiled_batch = None  # compiled again for the smaller size (padding would undo the split)
        self.warnings.append(
            f"a batch of {x.shape[0]} did not fit in {self.device} memory; continuing with "
            f"{self.max_chunk} per pass (use --batch-size {self.max_chunk} next time)"
        )
        return self._forward(x)


def _concat(parts):
    tokens = torch.cat([t for t, _ in parts])
    hidden = {k: torch.cat([h[k] for _, h in parts]) for k in parts[0][1]}
    return tokens, hidden


def _make_reporter(progress, total: int) -> Callable[[Progress | None], None]:
    """A callable fed Progress after each batch and None at the end."""
    if callable(progress):
        return lambda p: p is not None and progress(p)
    if not progress:
        return lambda p: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="img", file=sys.stderr)

    def report(p: Progress | None) -> None:
        if p is None:
            bar.close()
            return
        bar.update(p.done - bar.n)
        bar.set_postfix(failed=p.failed)

    return report
