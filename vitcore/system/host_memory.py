"""Keeping the main process's memory flat in the number of images.

Measured with bench/memory_growth.py (bench/RESULTS.md), storing all tokens: the main process
grew from about 0.7 GiB after 1,000 images to 1.3 GiB after 20,000. It was memory glibc held
free but could not hand back: the heap fragments around each batch's buffers. It grew with or
without the freed-memory retention earlier versions turned on (mallopt: never unmap, never trim,
for 4 % less run time on two cores); with the retention and trimming together it still grew by
21 %, and the retention no longer measurably paid for itself, so it is gone.

HeapWatch learns the resident size of the first batches (activations included) and, once the
process grows 10 % past it, gives glibc's free memory back (malloc_trim) after a batch: measured,
1,000 images 669 MiB, 20,000 images 732 MiB. Where glibc is not the C library it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's malloc_trim, or None where glibc is not the C library (musl, macOS, Windows)."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        trim = ctypes.CDLL(None).malloc_trim
    except (ValueError, OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class HeapWatch:
    """After each batch: give the heap's free memory back once the process has outgrown its first batches."""

    LEARN = 16  # batches whose peak sets the baseline
    SLACK = 1.10  # trim once resident memory is 10 % over the baseline

    def __init__(self) -> None:
        self.batches = 0
        self.baseline = 0
        self.trims = 0
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def after_batch(self) -> None:
        trim = _malloc_trim()
        if trim is None:
            return
        rss = self._resident()
        self.batches += 1
        if self.batches <= self.LEARN:
            self.baseline = max(self.baseline, rss)
        elif rss > self.baseline * self.SLACK:
            trim(0)
            self.trims += 1

    def _resident(self) -> int:
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return 0
