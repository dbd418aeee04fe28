"""Keeping large freed host buffers in the process instead of giving them back to the kernel.

A forward pass on the CPU allocates and frees activation buffers of tens of MiB in every block
(base, batch 8: the MLP hidden state is 32 MiB). glibc serves blocks above its mmap threshold
(which it never raises past 32 MiB) with a fresh mmap and unmaps them when they are freed, so
the next block's buffer is faulted in again, page by page, in the kernel. Measured on a 2-core
Xeon (bench/RESULTS.md): a whole `vit-extract run` on the CPU took 4 % less time (small, 48
JPEGs, and base, 16 JPEGs), its system time fell from 1.7 s to 0.65 s (small), and a loop of
forward passes alone ran up to 13 % faster.

``keep_freed_host_memory()`` tells glibc to serve every block from its heap and never to trim
it, so freed buffers are reused where they are already mapped: the peak stays in the process
until it exits, as with a caching allocator (measured: +22 to +35 MiB of peak memory).

It changes the whole process, so the command line turns it on (it owns the process), and only
for runs on the CPU with decoding workers: the main process then holds activations, not images.
The workers, forked from it, get ``WORKER`` instead, which is where glibc's own adaptive
threshold would settle, fixed (glibc cannot be put back to adapting once mallopt has been
called): blocks under 32 MiB reused, larger ones (a big photo's pixels) given back.
"""

from __future__ import annotations

import ctypes
import functools
import os

# mallopt(3) parameters.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
KEEP = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}  # the trim threshold is a C int
WORKER = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}

_kept = False  # KEEP applied in this process (and so inherited by forked children)


@functools.lru_cache(maxsize=None)
def _mallopt():
    """glibc's mallopt, or None where glibc is not the C library (musl, macOS, Windows).

    With jemalloc or tcmalloc preloaded, glibc's mallopt still answers but governs nothing:
    harmless. Looked up once; forked workers inherit the answer.
    """
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def _apply(settings: dict[int, int]) -> bool:
    """Apply each setting (mallopt returns 1 when it takes one); True if all were taken."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return all([mallopt(param, value) == 1 for param, value in settings.items()])  # every one tried


def keep_freed_host_memory() -> bool:
    """Serve every malloc from the heap and never trim it; False where glibc is not the allocator."""
    global _kept
    _kept = _mallopt() is not None  # whatever was taken is undone in the workers
    return _apply(KEEP) if _kept else False


def restore_in_child() -> None:
    """In a forked worker: give large blocks back again (WORKER), if the parent had kept them."""
    global _kept
    if _kept:
        _apply(WORKER)
        _kept = False
