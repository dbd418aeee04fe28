"""--compile auto: torch.compile where it pays, decided by measuring the run's own batches.

Whether compiling pays is not knowable in advance: on a 2-core AVX-512-BF16 CPU it made the seed
`small` encoder 6 % faster in float32 and 7 % slower in bfloat16 (bench/RESULTS.md), and the
compilation itself costs tens of seconds the first time (less once inductor's cache holds it).
So, for a compilable family:

- remembered (this machine, torch, device, encoder, dtype and batch size measured before):
  compile when the compiled batches were faster and this run's images save more time than the
  last compilation took; otherwise stay eager;
- not remembered, and the run long enough that a 10 % gain would repay a typical compilation:
  measure on the run's own full batches (batching.CompileTrial: 2 warm, 2 eager, one compiling, 2 compiled),
  keep the faster for the rest of the run and remember both times;
- otherwise (a short run): eager, silently.

The times live in a small JSON file under the user's cache folder, beside --dtype auto's. Inductor's
own compiled-code cache is put there too (unless TORCHINDUCTOR_CACHE_DIR says otherwise), so a
second run's compilation is quicker; its time is measured and remembered again every run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from vitcore.system.cache import cache_dir, read_json, write_json
from vitcore.system.calibrate import machine_key

CACHE_FILE = "compile.json"
MARGIN = 1.03  # compiled batches must be at least this much faster to be kept
TRIAL_GAIN = 0.10  # a trial is worth it when this share of the run's eager time ...
TRIAL_COMPILE_SECONDS = 60.0  # ... would repay a compilation of about this long


def use_inductor_cache() -> None:
    """Inductor's compiled code under our cache folder, kept across runs (unless the user chose one)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_dir(), "inductor"))


@dataclass
class Measured:
    eager: float  # seconds per image, eager
    compiled: float  # seconds per image, compiled
    compile_seconds: float  # the latest compilation, first call less an eager batch

    def faster(self) -> bool:
        return self.compiled * MARGIN < self.eager

    def pays_for(self, images: int) -> bool:
        """Faster, and by more over ``images`` than a compilation costs."""
        return self.faster() and images * (self.eager - self.compiled) > self.compile_seconds

    def words(self) -> str:
        return (f"{self.compiled * 1000:.1f} ms/image compiled against {self.eager * 1000:.1f} eager, "
                f"compiling {self.compile_seconds:.0f} s")


class CompileChoice:
    """The decision for one run: ``compiled`` from the first batch (remembered, or --compile on), a
    trial (measured on the run's batches: batching.CompileTrial), or eager. ``reason``: for the summary."""

    def __init__(self, mode: str, key: str | None, images: int, remembered: Measured | None):
        self.mode, self.key, self.images, self.remembered = mode, key, images, remembered
        self.reason: str | None = None
        self.compiled = mode == "on"
        if mode != "auto" or key is None:
            return
        if remembered is not None:
            self.compiled = remembered.pays_for(images)
            verdict = "compiled" if self.compiled else "eager"
            self.reason = f"{verdict}: {remembered.words()}, measured earlier on this machine"

    @property
    def trial_possible(self) -> bool:
        """Auto with nothing remembered: the run's first batches may measure (BatchRunner's CompileTrial)."""
        return self.mode == "auto" and self.key is not None and self.remembered is None

    def may_try(self, eager_seconds: float, images_left: int) -> bool:
        """Is this run, at ``eager_seconds`` per image, long enough for a trial to pay?"""
        return self.trial_possible and images_left * eager_seconds * TRIAL_GAIN > TRIAL_COMPILE_SECONDS

    def measured(self, result: Measured, keep: bool) -> None:
        """A trial's outcome: remembered for later runs, and said in this run's summary."""
        self.remembered = result
        verdict = "compiled" if keep else "eager"
        self.reason = f"{verdict}: {result.words()}, measured in this run"
        remember(self.key, result)

    def compiled_again(self, seconds: float) -> None:
        """A remembered choice compiled again: its time now (inductor's cache makes it shorter)."""
        if self.mode == "auto" and self.remembered is not None and self.key is not None:
            self.remembered.compile_seconds = seconds
            remember(self.key, self.remembered)


def choose_compile(mode: str, compilable: bool, device: torch.device, encoder_record: str, dtype: torch.dtype,
                   batch_size: int, images: int) -> CompileChoice:
    """The CompileChoice for a run of ``images`` images in batches of ``batch_size``."""
    if mode == "off" or not compilable:
        return CompileChoice("off" if mode != "on" else mode, None, images, None)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else machine_key()
    key = " | ".join((where, f"torch {torch.__version__}", encoder_record, str(dtype), f"batch {batch_size}"))
    return CompileChoice(mode, key, images, _remembered(key))


def _remembered(key: str) -> Measured | None:
    entry = read_json(os.path.join(cache_dir(), CACHE_FILE)).get(key)
    try:
        return Measured(float(entry["eager"]), float(entry["compiled"]), float(entry["compile_seconds"]))
    except (TypeError, KeyError, ValueError):
        return None  # none yet, or damaged: measure again


def remember(key: str, result: Measured) -> None:
    path = os.path.join(cache_dir(), CACHE_FILE)
    entry = {"eager": result.eager, "compiled": result.compiled, "compile_seconds": round(result.compile_seconds, 2),
             "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(path, {**read_json(path), key: entry})
