"""--dtype auto on the CPU, decided by measuring: a few matrix products of the encoder's own shape
in float32 and in bfloat16, the faster one chosen (bfloat16 only when it is clearly faster: it
rounds to 8 significant bits). A CPU's flags do not tell: one with AVX-512-BF16 but no AMX ran
bf16 at 0.5-0.6 of its float32 rate, while AMX runs it 5 times faster.

The result is kept in a small JSON file under the user's cache folder, keyed by the CPU (model name,
the flags that matter, logical CPUs), the torch version and the shape, so later runs reuse it and a
changed machine or torch measures again. Calibration takes well under a second.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from typing import Callable

import torch

from vitcore.system.cache import cache_dir, read_json, write_json

CACHE_FILE = "dtype.json"
FLOPS = 5e7  # the product timed: about this many operations (rows × D @ D × D; rows from 64 to 4,096)
GROUP_SECONDS = 0.01  # a timing repeats the product until it lasts about this long (small shapes are quick)
SLOW_SECONDS = 0.05  # one product this slow already says enough (an emulated bf16 can be 70× slower)
BF16_MARGIN = 1.05  # bf16 must be at least this much faster to be chosen over exact float32
FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma", "neon", "asimd", "sve", "bf16")


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str | None  # for the summary (None: asked for by name): "float32: bf16 ran at 0.57× …"


def machine_key() -> str:
    """This CPU as a measurement's key: its model name, the flags that decide matrix-product speed,
    how many logical CPUs the process may use, and the kernels torch and oneDNN were told to use
    (ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA can hold them below what the flags offer: then the
    same CPU multiplies at another speed)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "model name":
                    model = value.strip()
                elif name in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    kernels = torch.backends.cpu.get_cpu_capability()
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        kernels += f" oneDNN {os.environ['ONEDNN_MAX_CPU_ISA']}"
    return (f"{model} | {' '.join(f for f in FLAGS if f in flags)} | {cpus} cpus | torch threads {torch.get_num_threads()}"
            f" | {kernels}")


def product_shape(width: int) -> tuple[int, int]:
    """(rows, width) of the product timed for an encoder of token width ``width``."""
    rows = int(min(4096, max(64, FLOPS / (2 * width * width))))
    return rows - rows % 16 or 16, width


def product_seconds(dtype: torch.dtype, rows: int, width: int) -> float:
    """Seconds for one (rows × width) @ (width × width) product in ``dtype``: after a warm-up call
    (the kernel chosen, its buffers made), a group of calls lasting about GROUP_SECONDS, per call;
    a single call slower than SLOW_SECONDS is taken as it is."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, width, generator=generator).to(dtype)
    b = torch.randn(width, width, generator=generator).to(dtype)
    with torch.inference_mode():
        a @ b
        started = time.perf_counter()
        a @ b
        single = time.perf_counter() - started
        if single > SLOW_SECONDS:
            return single
        calls = max(1, min(1000, round(GROUP_SECONDS / max(single, 1e-7))))
        started = time.perf_counter()
        for _ in range(calls):
            a @ b
        return min(single, (time.perf_counter() - started) / calls)


def speed_ratio(width: int, measure: Callable[..., float] | None = None, rounds: int = 3) -> float:
    """float32's time over bfloat16's for the product of ``width`` (> 1: bf16 faster): the best of
    each over ``rounds`` interleaved rounds, so a burst of load elsewhere cannot favour either;
    one round when bf16 is clearly slower (an emulated bf16 takes long to time)."""
    measure = measure or product_seconds
    rows, width = product_shape(width)
    float32 = bfloat16 = float("inf")
    for _ in range(rounds):
        float32 = min(float32, measure(torch.float32, rows, width))
        bfloat16 = min(bfloat16, measure(torch.bfloat16, rows, width))
        if bfloat16 > 3 * float32:
            break
    return float32 / bfloat16


def choose_cpu_dtype(width: int, measure: Callable[..., float] | None = None) -> DtypeChoice:
    """float32 or bfloat16 for an encoder of token width ``width`` on this CPU, by measurement,
    from the cache where this machine, torch and shape were measured before."""
    key = f"{machine_key()} | torch {torch.__version__} | {'×'.join(map(str, product_shape(width)))}"
    path = os.path.join(cache_dir(), CACHE_FILE)
    known = read_json(path)
    if key in known and known[key].get("ratio") is not None:
        ratio = float(known[key]["ratio"])
        return _choice(ratio, "measured earlier on this CPU")
    ratio = speed_ratio(width, measure)
    write_json(path, {**known, key: {"ratio": round(ratio, 4), "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}})
    return _choice(ratio, "measured on this CPU")


def _choice(ratio: float, where: str) -> DtypeChoice:
    if ratio >= BF16_MARGIN:
        return DtypeChoice(torch.bfloat16, f"bfloat16: {ratio:.2f}× float32's matrix-product speed, {where}")
    return DtypeChoice(torch.float32, f"float32: bf16 ran at {ratio:.2f}× float32's matrix-product speed, {where}")


def slow_half_note(width: int, measure: Callable[..., float] | None = None) -> str | None:
    """--dtype float16 named on a CPU: a note when this CPU multiplies float16 clearly slower than
    float32 (most emulate it: 5× slower on a 2-core EPYC), naming what is faster here; else None."""
    measure = measure or product_seconds
    rows, width = product_shape(width)
    float32 = min(measure(torch.float32, rows, width) for _ in range(2))
    half = measure(torch.float16, rows, width)
    if half <= 1.25 * float32:
        return None
    bfloat16 = measure(torch.bfloat16, rows, width)
    faster = "bfloat16 (same size, float32's range)" if bfloat16 < float32 / BF16_MARGIN else "float32"
    return (f"--dtype float16: this CPU multiplied float16 at {float32 / half:.2f}× float32's speed; "
            f"{faster} is faster here (or --dtype auto)")
