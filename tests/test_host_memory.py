"""keep_freed_host_memory: freed large buffers are reused without page faults; workers give large ones back."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not hasattr(os, "confstr") or "CS_GNU_LIBC_VERSION" not in os.confstr_names
    or not os.confstr("CS_GNU_LIBC_VERSION"),
    reason="a glibc allocator setting",
)

# Page faults taken to allocate, fill and free a buffer of `mib` MiB after another one was freed:
# one per 4 KiB page (16,384 for 64 MiB) when glibc maps and unmaps it afresh, none when it is
# reused (after a round or two: the first may extend the heap, and a forked child copies shared
# pages). Transparent huge pages are turned off first: with them a fresh mapping takes a fault
# per 2 MiB, and the counts would not tell the two cases apart.
SCRIPT = textwrap.dedent(
    """
    import ctypes, resource
    import torch
    import torch.utils.data
    from vitcore import host_memory
    from vitcore.workers import init_worker

    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE, inherited by the workers

    def faults(mib):
        torch.ones(mib << 18).sum()  # freed at once (torch asks for no huge pages; numpy does)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(mib << 18).sum()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    def least(mib):
        return min(faults(mib) for _ in range(5))

    class InWorker(torch.utils.data.Dataset):
        def __len__(self):
            return 1
        def __getitem__(self, i):
            return least(64), least(8)

    default = least(64)
    kept = host_memory.keep_freed_host_memory()
    after = least(64), least(8)
    loader = torch.utils.data.DataLoader(InWorker(), num_workers=1, worker_init_fn=init_worker)
    in_worker = [int(x) for x in next(iter(loader))]
    still = least(64)  # the parent keeps the setting
    print(default, kept, *after, *in_worker, still)
    """
)


def test_freed_buffers_are_reused_in_the_process_and_large_ones_given_back_in_workers():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    default, kept, after_64, after_8, worker_64, worker_8, still = done.stdout.split()
    assert kept == "True"
    assert int(default) > 8000  # 64 MiB is above glibc's largest mmap threshold: mapped afresh
    assert int(after_64) < 500 and int(after_8) < 500 and int(still) < 500
    assert int(worker_64) > 8000  # a worker gives a block this large back…
    assert int(worker_8) < 500  # …and reuses smaller ones, as glibc's adaptive threshold would
