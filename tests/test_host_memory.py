"""HeapWatch: the main process gives glibc's free memory back once it outgrows its first batches."""

import os

import pytest

from vitcore.system import host_memory

pytestmark = pytest.mark.skipif(
    not hasattr(os, "confstr") or "CS_GNU_LIBC_VERSION" not in os.confstr_names
    or not os.confstr("CS_GNU_LIBC_VERSION"),
    reason="malloc_trim is glibc's",
)

def test_the_heap_watch_trims_only_when_the_process_grows_past_its_first_batches(monkeypatch):
    """The first batches (activations and all) set the baseline; a process that grows 10 % past it
    gives its free heap back (malloc_trim), one that does not keeps it (the retention's point)."""
    trims = []
    monkeypatch.setattr(host_memory, "_malloc_trim", lambda: trims.append)
    watch = host_memory.HeapWatch()
    sizes = iter([100, 180, 200, 190] + [195] * 12 + [210, 219, 221, 250, 200])  # MiB
    monkeypatch.setattr(watch, "_resident", lambda: next(sizes) << 20)
    for _ in range(21):
        watch.after_batch()
    assert watch.baseline == 200 << 20
    assert trims == [0, 0] and watch.trims == 2  # only at 221 and 250 MiB: past 220
