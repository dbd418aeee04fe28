"""Keeping large freed host buffers in the process instead of giving them back to the kernel.

A forward pass on the CPU allocates and frees activation buffers of tens of MiB in every block
(base, batch 8: the MLP hidden state is 32 MiB). glibc serves blocks above its mmap threshold
(which it never raises past 32 MiB) with a fresh mmap and unmaps them when they are freed, so
the next block's buffer is faulted in again, page by page, in the kernel. Measured on a 2-core
Xeon (bench/RESULTS.md): a whole `vit-extract run` took 4 % less time (small, 48 JPEGs, and
base, 16 JPEGs), its system time fell from 1.7 s to 0.65 s (small), and a loop of forward
passes alone ran up to 13 % faster.

``keep_freed_host_memory()`` tells glibc to serve every block from its heap and never to trim
it, so freed buffers are reused where they are already mapped: the peak stays in the process
until it exits, as with a caching allocator (measured: +22 to +35 MiB of peak memory).

It changes the whole process, so the command line turns it on (it owns the process), not the
library. DataLoader workers, forked from that process, go back to glibc's defaults: they decode
images of any size and should give that memory back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt(3) parameters and glibc's defaults for them.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}
KEEP = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}  # the trim threshold is a C int

_kept = False  # set in this process (and inherited by forked children)


def _mallopt():
    """glibc's mallopt, or None (musl, macOS, Windows: their allocators are left alone)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def _apply(settings: dict[int, int]) -> bool:
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return all(mallopt(param, value) == 1 for param, value in settings.items())  # 1 = accepted


def keep_freed_host_memory() -> bool:
    """Serve every malloc from the heap and never trim it; False where glibc is not the allocator."""
    global _kept
    _kept = _apply(KEEP)
    return _kept


def restore_in_child() -> None:
    """In a forked child: glibc's default behaviour again, if the parent had changed it."""
    global _kept
    if _kept:
        _apply(DEFAULTS)
        _kept = False
