"""One batching path for every encoder family: a batch of decoded images → Rows for the writer.

    batch (uint8, from the workers) → [finish_batch: GPU JPEG decode] → device
      → family encode (split in halves while the device runs out of memory; compiled batches padded)
      → per stored array: pooling and the mean token in float32 → stored dtype
      → images with inf/NaN counted where they were made
      → CUDA: copy stream into pinned host buffers (transfer.py); CPU: numpy views

A family supplies only ``encode`` (encoders/base.py); everything here is written once.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from vitcore.errors import VitExtractError
from vitcore.system.device import is_out_of_memory
from vitcore.encoders.base import BuiltEncoder, Encoded
from vitcore.encoders.layers import pool_tokens
from vitcore.imaging.loader import Batch
from vitcore.run.compile_choice import CompileChoice, Measured, use_inductor_cache
from vitcore.run.transfer import HostCopier
from vitcore.store import Rows, StoreSettings
from vitcore.store.encoding import numpy_dtype


class BatchRunner:
    """Batch → Rows on the device, for any family.

    When a batch does not fit in device memory it is split in halves (recursively) and the size
    that fitted is used from then on; one image that does not fit is a clear error. A compiled
    encoder (a compilable family, --compile on, or auto where it pays) is traced on its first batch
    for that batch size only; a later, smaller batch is padded to it with blank images rather than
    compiled again.
    """

    def __init__(self, built: BuiltEncoder, settings: StoreSettings, device: torch.device,
                 compile: CompileChoice | None = None):
        self.built, self.settings, self.device = built, settings, device
        self.choice = compile  # --compile: on, off, or auto (compile_choice.py); None: eager
        self.compiled: Callable | None = None  # built.compiled_encode(), once compiling starts
        self.compile_seconds: float | None = None  # this run's compilations, all told
        self.compiled_batch: int | None = None
        self.trial: CompileTrial | None = None  # --compile auto measuring on this run's batches
        self.images = 0  # encoded so far
        self.max_chunk: int | None = None  # images per forward pass, once memory ran out
        self.warnings: list[str] = []
        self.to_host = HostCopier(device) if device.type == "cuda" else None
        if compile is not None and compile.compiled:
            self._start_compiling()
        elif compile is not None and compile.trial_possible:
            self.trial = CompileTrial(compile)

    def __call__(self, batch: Batch, sources) -> Rows:
        if self.built.finish_batch is not None:
            batch = self.built.finish_batch(batch, sources)
        n = len(batch.indices)
        if n:
            encoded = self._encode(_to_device(batch.pixels, self.device))
            arrays, counts, nonfinite = self._stored(encoded)
            grid_thw = np.asarray(encoded.grid_thw, np.int32).reshape(n, 3) if self.settings.grid_thw else None
        else:  # every image of this batch failed: empty rows, failures only
            arrays, counts, nonfinite = self._empty()
            grid_thw = np.empty((0, 3), np.int32) if self.settings.grid_thw else None
        rows = batch_rows(batch, sources, arrays=arrays, counts=counts, grid_thw=grid_thw, nonfinite=nonfinite)
        # On a GPU the results go to the host on a copy stream (transfer.py), and this thread goes
        # on to the next batch without waiting. On the CPU they are there already: numpy views.
        return self.to_host(rows) if self.to_host is not None and n else rows.to_host()

    # -- stored layout -------------------------------------------------------------------
    def _stored(self, encoded: Encoded):
        """Encoded → (dataset name → stored values, flat dataset → counts, non-finite image count)."""
        settings = self.settings
        pool, store = settings.pooling, getattr(torch, settings.out_dtype)
        arrays, counts = {}, {}
        nonfinite = None
        for spec in settings.arrays:
            if pool == "model":  # the encoder's own pooled embedding, (n, E)
                arrays["tokens"] = encoded.arrays["embedding"].float().to(store)
                nonfinite = _nonfinite_images(arrays["tokens"], None)
                continue
            x = encoded.arrays[spec.name].float()  # pooling and the mean token in float32 (one copy)
            sizes = encoded.counts.get(spec.name)
            per_image = x.split(sizes) if sizes is not None else None
            if pool != "none":
                values = (torch.stack([pool_tokens(p[None], pool)[0] for p in per_image])
                          if per_image is not None else pool_tokens(x, pool))  # (n, W)
            elif spec.ragged:
                values = x  # (Σ T_i, W)
                counts[spec.name] = np.asarray(sizes, np.int32)
            else:
                values = x.reshape(encoded.images, *spec.shape)  # (n, T, W): equal counts when fixed
            if spec.name == "tokens" and settings.mean:
                mean = torch.stack([p.mean(0) for p in per_image]) if per_image is not None else x.mean(dim=1)
                arrays["mean"] = mean.to(store)
            arrays[spec.name] = values.to(store)
            if spec.name == "tokens":
                nonfinite = _nonfinite_images(arrays["tokens"], counts.get("tokens"))
        return arrays, counts, nonfinite

    def _empty(self):
        dtype = numpy_dtype(self.settings.out_dtype)
        arrays = {spec.name: np.empty((0, *spec.shape), dtype) for spec in self.settings.arrays}
        counts = {spec.name: np.empty(0, np.int32) for spec in self.settings.arrays if spec.ragged}
        if self.settings.mean:
            arrays["mean"] = np.empty((0, self.settings.arrays[0].width), dtype)
        return arrays, counts, 0

    # -- the forward pass ----------------------------------------------------------------
    def _encode(self, pixels) -> Encoded:
        n = len(pixels)
        if self.max_chunk is not None and n > self.max_chunk:
            size = self.max_chunk  # fixed for this split: a part may lower max_chunk again
            return Encoded.concat([self._encode(pixels[i:i + size]) for i in range(0, n, size)])
        try:
            if self.trial is not None:
                out = self.trial.step(self, pixels)
            elif self.compiled is not None:
                out = self._encode_compiled(pixels)
            else:
                out = self.built.encode(pixels)
            self.images += n
            return out
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if n == 1:
            raise VitExtractError(
                f"out of {self.device} memory for a single image; use a smaller --model, "
                "--dtype bfloat16, or another --device"
            ) from None
        self.max_chunk = n // 2
        self.compiled_batch = None  # compiled again for the smaller size (padding would undo the split)
        self.trial = None  # a trial's times would mix batch sizes: eager unless compiling already
        self.warnings.append(
            f"a batch of {n} did not fit in {self.device} memory; continuing with "
            f"{self.max_chunk} per pass (use --batch-size {self.max_chunk} next time)"
        )
        return self._encode(pixels)

    def _start_compiling(self) -> None:
        use_inductor_cache()
        self.compiled = self.built.compiled_encode()
        self.compile_seconds = self.compile_seconds or 0.0

    def _encode_compiled(self, pixels: torch.Tensor) -> Encoded:
        n = pixels.shape[0]
        if self.compiled_batch is None:  # the first call compiles: time it apart from the rest
            tick = time.perf_counter()
            out = self.compiled(pixels)
            seconds = time.perf_counter() - tick
            self.compile_seconds += seconds
            self.compiled_batch = n
            if self.choice is not None and self.trial is None:
                self.choice.compiled_again(seconds)
            return out
        if n >= self.compiled_batch:
            return self.compiled(pixels)
        blank = pixels.new_zeros((self.compiled_batch - n, *pixels.shape[1:]))  # images never mix
        return self.compiled(torch.cat([pixels, blank])).head(n)


class CompileTrial:
    """--compile auto with nothing remembered: eager and compiled timed on this run's own full
    batches, then the faster kept for the rest of the run (and remembered; compile_choice.py).

    Full batches 1-2 run eager untimed (kernels chosen, weights reordered, buffers made: a bf16
    encoder's second batch was still 5-8 % slower than its later ones), 3-4 eager and timed, 5
    compiles (its time, less an eager batch's, is the compilation), 6-7 compiled and timed; the best
    of each pair counts (a noisy machine only ever slows a batch down). Other sizes (the last batch)
    run eager and do not count. Tokens from either agree to the dtype's rounding.
    """

    WARM = 2  # full eager batches before any is timed
    TIMED = 2  # full batches timed in each mode

    def __init__(self, choice: CompileChoice):
        self.choice = choice
        self.size: int | None = None  # the full batch size: the first batch's
        self.seen = 0  # full batches so far
        self.eager = self.compiled = float("inf")  # the best seconds per full batch
        self.compile_seconds = 0.0

    def step(self, runner: BatchRunner, pixels: torch.Tensor) -> Encoded:
        n = len(pixels)
        self.size = self.size or n
        if n != self.size:
            return runner.built.encode(pixels)
        self.seen += 1
        compiling_at = self.WARM + self.TIMED + 1
        if self.seen <= self.WARM:
            return runner.built.encode(pixels)
        tick = time.perf_counter()
        if self.seen < compiling_at:
            out = runner.built.encode(pixels)
            self.eager = min(self.eager, time.perf_counter() - tick)
            left = self.choice.images - runner.images - n
            if self.seen == compiling_at - 1 and not self.choice.may_try(self.eager / n, left):
                runner.trial = None  # too short a run to pay for a compilation: eager to the end
            return out
        if self.seen == compiling_at:
            runner._start_compiling()
            out = runner._encode_compiled(pixels)
            self.compile_seconds = max(0.0, time.perf_counter() - tick - self.eager)
            return out
        out = runner._encode_compiled(pixels)
        self.compiled = min(self.compiled, time.perf_counter() - tick)
        if self.seen == compiling_at + self.TIMED:
            measured = Measured(self.eager / n, self.compiled / n, self.compile_seconds)
            self.choice.measured(measured, keep=measured.faster())
            if not measured.faster():
                runner.compiled = None
            runner.trial = None
        return out


def _to_device(pixels, device: torch.device):
    if isinstance(pixels, list):
        return [p.to(device, non_blocking=True) for p in pixels]
    return pixels.to(device, non_blocking=True)


def _nonfinite_images(values: torch.Tensor, counts: np.ndarray | None) -> torch.Tensor:
    """How many images have an inf or NaN in their stored tokens: a 0-d tensor on their device."""
    if counts is None:
        return (~torch.isfinite(values.reshape(len(values), -1))).any(dim=1).sum()
    bad_token = (~torch.isfinite(values)).any(dim=1).float()  # (Σ T_i,)
    image = torch.repeat_interleave(torch.arange(len(counts), device=values.device),
                                    torch.as_tensor(counts, device=values.device, dtype=torch.long))
    per_image = torch.zeros(len(counts), device=values.device).index_add_(0, image, bad_token)
    return (per_image > 0).sum()


def batch_rows(batch: Batch, sources: list, **fields) -> Rows:
    """A batch's keys, roots, sizes and failures as writer Rows, with the encoder's ``fields``."""
    n = len(batch.indices)
    return Rows(
        keys=[sources[i].key for i in batch.indices],
        root_index=np.asarray([sources[i].root_index for i in batch.indices], dtype=np.int32),
        image_size=np.asarray(batch.sizes, dtype=np.int32).reshape(n, 2),
        failed_keys=[sources[f.index].key for f in batch.failures],
        failed_root_index=[sources[f.index].root_index for f in batch.failures],
        failed_errors=[f.error for f in batch.failures],
        meta=_meta_columns(batch),
        **fields,
    )


def _meta_columns(batch: Batch) -> dict[str, list[str | None]]:
    """name → text of each decoded image, in the order of ``batch.indices`` (None: it has none)."""
    if not batch.meta:
        return {}
    names = next(iter(batch.meta.values())).keys()
    return {name: [batch.meta[i][name] for i in batch.indices] for name in names}
