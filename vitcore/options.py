"""A run's settings: the flat ExtractOptions the CLI and the Python API fill, and the four validated
parts extract() works with (encoder, inputs, compute, output). Each part checks itself when built,
so a bad value is refused in one place, before any model is built or file touched; what only a
family can judge (which options it takes) is its check(). The lists a user writes (--ext, --keep,
--columns) are parsed here too, so every layer above reads them the same way."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

from vitcore.choices import COMPILE_MODES, COMPRESSIONS, DECODE_MODES, DTYPE_CHOICES, OUT_DTYPES, POOLING_MODES, PROCESSOR_BACKENDS, RESIZE_MODES
from vitcore.errors import UsageError

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def compile_mode(value) -> str:
    """--compile as one of COMPILE_MODES (True / False from the Python API: on / off)."""
    if value is True:
        return "on"
    if value is False or value is None:
        return "off"
    return str(value).strip().lower()


def _one_of(flag: str, value, choices) -> None:
    if value not in choices:
        raise UsageError(f"{flag} {value!r} is not one of {', '.join(choices)}")


def check_seed(seed: int) -> None:
    if seed < 0:
        raise UsageError(f"--seed must be non-negative, got {seed}")


def comma_list(text: str | Iterable[str] | None) -> list[str]:
    """``"a, b,,c"``, or a sequence of such (an option given several times) → ["a", "b", "c"]:
    each item stripped, empty ones dropped."""
    given = [text or ""] if isinstance(text, str) or text is None else list(text)
    return [p.strip() for item in given for p in str(item).split(",") if p.strip()]


def parse_extensions(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"jpg,.PNG"`` → ("jpg", "png"); None → the defaults."""
    if text is None:
        return DEFAULT_EXTENSIONS
    exts = tuple(sorted({p.lstrip(".").lower() for p in comma_list(text) if p.lstrip(".")}))
    if not exts:
        raise UsageError("--ext needs at least one extension, e.g. --ext jpg,png")
    return exts


@dataclass(frozen=True)
class ContainerOptions:
    keep: tuple[str, ...] = ()  # WebDataset sidecar extensions stored as meta/<ext>
    columns: tuple[str, ...] = ()  # Parquet columns stored as meta/<column>
    image_column: str | None = None  # None: the first column holding image bytes

    @property
    def meta_names(self) -> tuple[str, ...]:
        return self.keep + self.columns


def parse_names(text, what: str) -> tuple[str, ...]:
    """``"txt,json"`` → ("txt", "json"), in the order given, each once. ``--keep`` extensions are
    matched whatever their case (as image extensions are), so they are kept in lower case."""
    if text is None:
        return ()
    parts = comma_list(text)
    if what == "--keep":
        parts = [p.lstrip(".").lower() for p in parts]
    names = tuple(dict.fromkeys(parts))
    for name in names:
        if not name or name in (".", "..") or "/" in name:
            raise UsageError(f"{what} {name or '.'!r} is not a name that can be stored (meta/<name>): "
                             "give names such as " + ("txt,json" if what == "--keep" else "caption,url"))
    return names


def check_meta_names(options: ContainerOptions) -> None:
    clash = set(options.keep) & set(options.columns)
    if clash:
        raise UsageError(f"--keep and --columns both name {', '.join(sorted(clash))}: each becomes meta/<name>; "
                         "rename one (Parquet columns cannot be renamed here, so keep that one)")


@dataclass(frozen=True)
class EncoderOptions:
    """Which encoder, with which weights, seeing which pixels."""

    model: Any = None  # preset, custom spec, config or family name; None: the weights' own, or base
    weights: str | None = None  # a weights file or checkpoint folder
    seed: int = 0  # initialisation seed when no weights are given
    project_dim: int | None = None
    layers: tuple[int, ...] = ()
    resize: str = "squash"
    decode: str | None = None  # None: the family's default
    resolution: str = "native"
    features: tuple[str, ...] = ()
    processor: str | None = None  # transformers-processed families: torchvision or pil; None: the family's default
    drop_prefix: bool = False  # store patch tokens only: without the CLS / register tokens (LLaVA's select_feature=patch)
    fps: float | None = None  # video clips: frames sampled per second (the video processor's fps)
    max_frames: int | None = None  # video clips: at most this many frames (the video processor's max_frames)
    videos: bool = False  # set by the run's checks: video clips are among the inputs (their settings are recorded)

    def __post_init__(self) -> None:
        _one_of("--resize", self.resize, RESIZE_MODES)
        if self.decode is not None:
            _one_of("--decode", self.decode, DECODE_MODES)
        if self.processor is not None:
            _one_of("--processor", self.processor, PROCESSOR_BACKENDS)
        check_seed(self.seed)


@dataclass(frozen=True)
class InputOptions:
    files_from: str | None = None  # a file of paths, or "-" for stdin
    extensions: Any = None  # "jpg,png" or a sequence; None: the defaults
    keep: Any = None  # "txt,json": WebDataset sidecars stored as meta/<ext>
    columns: Any = None  # "caption,url": Parquet columns stored as meta/<column>
    image_column: str | None = None  # Parquet: None: the first column holding image bytes
    max_image_pixels: int | None = None  # Pillow's decompression-bomb limit; None: Pillow's own (~89 MP), 0: none

    def __post_init__(self) -> None:
        parse_extensions(self.extensions)  # refuses an empty list
        check_meta_names(self.containers)
        if self.max_image_pixels is not None and (isinstance(self.max_image_pixels, bool) or not isinstance(self.max_image_pixels, int)
                                            or self.max_image_pixels < 0):
            raise UsageError(f"--max-image-pixels must be a whole number of pixels, 0 or more (0: no limit), "
                             f"got {self.max_image_pixels!r}")

    @property
    def containers(self) -> ContainerOptions:
        return ContainerOptions(keep=parse_names(self.keep, "--keep"), columns=parse_names(self.columns, "--columns"),
                                image_column=self.image_column or None)


@dataclass(frozen=True)
class ComputeOptions:
    batch_size: int | str = "auto"
    workers: int | None = None  # None: min(8, CPUs available)
    device: str = "auto"
    dtype: str = "auto"
    compile: str | bool = "auto"  # auto | on | off (True / False: on / off)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compile", compile_mode(self.compile))
        _one_of("--compile", self.compile, COMPILE_MODES)
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise UsageError(f"--batch-size must be a positive integer or auto, got {self.batch_size!r}")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"--workers must be 0 or more, got {self.workers}")
        _one_of("--dtype", (self.dtype or "auto").strip().lower(), DTYPE_CHOICES)


@dataclass(frozen=True)
class OutputOptions:
    pool: str = "none"
    out_dtype: str = "float16"
    compression: str = "none"
    resume: bool = False
    retry_failed: bool = False
    overwrite: bool = False
    shard: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        _one_of("--pool", self.pool, POOLING_MODES)
        _one_of("--out-dtype", self.out_dtype, OUT_DTYPES)
        _one_of("--compression", self.compression, COMPRESSIONS)
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite contradict each other; choose one")
        if self.retry_failed and not self.resume:
            raise UsageError("--retry-failed goes with --resume: it retries the failures an existing output records")


@dataclass
class ExtractOptions:
    """Every setting of a run, flat; the CLI fills one from its options."""

    model: Any = None  # preset, custom spec or config, or a family name; None: base or the weights' own
    weights: str | None = None  # .safetensors written by save_weights / init-weights, or a checkpoint folder
    seed: int = 0  # initialisation seed when no weights are given
    pool: str = "none"  # none | mean | max | model (the encoder's own pooled embedding)
    project_dim: int | None = None  # projector Linear(D → P)
    layers: tuple[int, ...] = ()  # also store hidden states after these blocks (-2: penultimate)
    resize: str = "squash"  # squash | crop | pad (seed encoders)
    decode: str | None = None  # draft | full | gpu; None: the family's default
    resolution: str = "native"  # native-resolution families: native (the processor's rule) or N (N × N)
    features: tuple[str, ...] = ()  # a family's extra outputs (see its --features)
    processor: str | None = None  # Qwen-VL, SigLIP, CLIP, DINOv2: torchvision | pil (transformers' backends); None: torchvision
    drop_prefix: bool = False  # SigLIP, CLIP, DINOv2: patch tokens only, without the CLS / register tokens
    fps: float | None = None  # Qwen-VL video clips: frames sampled per second; None: the checkpoint's video processor
    max_frames: int | None = None  # Qwen-VL video clips: at most this many frames; None: the checkpoint's
    batch_size: int | str = "auto"
    workers: int | None = None  # None: min(8, CPUs available)
    device: str = "auto"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    out_dtype: str = "float16"  # stored dtype: float16 | float32 | bfloat16
    compression: str = "none"  # none | gzip | lz4 | zstd (lz4, zstd: the [compression] extra)
    files_from: str | None = None  # a file of paths, or "-" for stdin
    extensions: str | tuple[str, ...] | None = None  # None: jpg jpeg png webp bmp gif tif tiff
    keep: str | tuple[str, ...] | None = None  # tar shards (and loose files): sidecar extensions kept as meta/<ext>
    columns: str | tuple[str, ...] | None = None  # Parquet: columns kept as meta/<column>
    image_column: str | None = None  # Parquet: the image column; None: the first holding image bytes
    max_image_pixels: int | None = None  # pictures over this many pixels are failures; None: Pillow's limit (~89 MP), 0: none
    resume: bool = False
    retry_failed: bool = False  # with resume: decode the images the file records as failed again
    overwrite: bool = False
    shard: tuple[int, int] | None = None  # (I, N): only inputs [I·T/N, (I+1)·T/N); resumed automatically
    compile: str | bool = "auto"  # torch.compile: on, off, or auto (where measured to pay; run/compile_choice.py)

    def parts(self) -> tuple[EncoderOptions, InputOptions, ComputeOptions, OutputOptions]:
        """The four validated parts (each raises UsageError for a bad value)."""
        return (_take(EncoderOptions, self), _take(InputOptions, self), _take(ComputeOptions, self),
                _take(OutputOptions, self))


def _take(part, opts: ExtractOptions):
    return part(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(part) if hasattr(opts, f.name)})
