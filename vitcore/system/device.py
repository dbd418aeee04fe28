"""Choosing the device and the compute dtype.

``--dtype auto``: on a CUDA GPU, bfloat16 where the card computes it, else float32. On the CPU,
whichever of float32 and bfloat16 multiplies the encoder's matrices faster here, by measurement
(calibrate.py; bf16 only when clearly faster), since the CPU's flags do not tell: AVX-512-BF16
without AMX ran bf16 slower than float32. Without an encoder to measure for (or if measuring
fails), the flags decide: bfloat16 with AMX or AVX-512-BF16.
"""

from __future__ import annotations

import functools

import torch

from vitcore.choices import DTYPE_CHOICES
from vitcore.errors import UsageError, one_line
from vitcore.system.calibrate import DtypeChoice, choose_cpu_dtype

# Below this token width a product lasts microseconds and its timing is the thread pool's wake-up
# (on a 2-core VM one float32 product of 4096 × 32 took 0.16 ms or 16 ms by turns): the flags decide.
MEASURED_WIDTH = 256
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # keys: DTYPE_CHOICES[1:]


def resolve_device(name: str = "auto") -> torch.device:
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise UsageError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX-512-BF16: the CPU multiplies bf16 in hardware."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    try:
        return any(getattr(torch.cpu, probe)() for probe in probes if hasattr(torch.cpu, probe))
    except Exception:  # an older torch without the probes: read the kernel's flags instead
        try:
            with open("/proc/cpuinfo") as handle:
                flags = handle.read()
        except OSError:
            return False
        return " amx_bf16" in flags or " avx512_bf16" in flags


def choose_dtype(name: str, device: torch.device, width: int | None = None,
                 resuming: str | None = None) -> DtypeChoice:
    """The compute dtype, and for ``auto`` why (``width``: the encoder's token width, to measure
    its matrix products on the CPU; ``resuming``: the dtype of the file a run resumes, which auto
    keeps); an explicit dtype has no reason."""
    name = (name or "auto").strip().lower()
    if name == "auto" and resuming in DTYPES:
        return DtypeChoice(DTYPES[resuming], f"{resuming}: as the file being resumed was computed")
    if name == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return DtypeChoice(torch.bfloat16, "bfloat16: the GPU computes it natively")
            return DtypeChoice(torch.float32, "float32: this GPU has no bfloat16")
        if width is not None and width >= MEASURED_WIDTH:
            try:
                return choose_cpu_dtype(width)
            except Exception as err:  # a failed measurement must not stop the run: the flags decide
                fallback = f"measuring failed ({one_line(err, 80)}), so by the CPU's flags"
        elif width is not None:
            fallback = f"an encoder of width {width} is too small to time fairly, so by the CPU's flags"
        else:
            fallback = "by the CPU's flags"
        if cpu_has_native_bf16():
            return DtypeChoice(torch.bfloat16, f"bfloat16: AMX or AVX-512-BF16, {fallback}")
        return DtypeChoice(torch.float32, f"float32: no AMX or AVX-512-BF16, {fallback}")
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}: use {', '.join(DTYPE_CHOICES)}")
    return DtypeChoice(DTYPES[name], None)


def resolve_dtype(name: str, device: torch.device, width: int | None = None) -> torch.dtype:
    return choose_dtype(name, device, width).dtype


def is_out_of_memory(err: BaseException) -> bool:
    """A device (or host) allocation failed: the batching path splits the batch and tries again."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
