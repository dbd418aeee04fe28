"""Choosing the device and the compute dtype.

``--dtype auto`` means bfloat16 where the hardware computes it natively (CUDA GPUs with bf16,
CPUs with AMX or AVX-512-BF16) and float32 elsewhere: on a CPU without those instructions
bf16 matmuls are emulated and slower than float32.
"""

from __future__ import annotations

import functools

import torch

from vitcore.choices import DTYPE_CHOICES
from vitcore.errors import UsageError

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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    name = (name or "auto").strip().lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}: use {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def is_out_of_memory(err: BaseException) -> bool:
    """A device (or host) allocation failed: the batching path splits the batch and tries again."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
