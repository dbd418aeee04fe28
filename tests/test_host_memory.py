"""keep_freed_host_memory: freed large buffers are reused without page faults; workers get glibc's defaults back."""

import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc allocator setting"
)

# Page faults taken to allocate, fill and free a 64 MiB buffer after another one was freed:
# about 16,384 (one per 4 KiB page) when glibc maps and unmaps it afresh, none when it is reused
# (after a round or two: the first may extend the heap, and a forked child copies shared pages).
SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import torch
    import torch.utils.data
    from vitcore import host_memory
    from vitcore.pipeline import _init_worker

    def faults():
        torch.ones(16 << 20).sum()  # 64 MiB, freed at once (torch asks for no huge pages, numpy does)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 << 20).sum()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    def least_faults():
        return min(faults() for _ in range(5))

    class InWorker(torch.utils.data.Dataset):
        def __len__(self):
            return 1
        def __getitem__(self, i):
            return least_faults()

    default = least_faults()
    kept = host_memory.keep_freed_host_memory()
    after = least_faults()
    loader = torch.utils.data.DataLoader(InWorker(), num_workers=1, worker_init_fn=_init_worker)
    in_worker = int(next(iter(loader))[0])
    still = least_faults()  # the parent keeps the setting
    print(default, kept, after, in_worker, still)
    """
)


def test_freed_buffers_are_reused_in_the_process_and_given_back_in_workers():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    default, kept, after, in_worker, still = done.stdout.split()
    assert kept == "True"
    assert int(default) > 8000  # mapped afresh: a fault per page
    assert int(after) < 500
    assert int(still) < 500
    assert int(in_worker) > 8000  # the worker is back on glibc's defaults
