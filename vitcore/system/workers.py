"""The main process's side of the decoding worker processes (torch-free): how they start, how a
dying one is kept from cutting cleanup short, and how they are stopped.

PyTorch reports a dead DataLoader worker by raising from its SIGCHLD handler, wherever the main
thread is. That is how a run learns that the OOM killer took a worker, but while the output is
being opened or closed it would leave an HDF5 handle behind, so those moments hold the signal.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import threading


def init_worker(_worker_id: int) -> None:
    """Run first in every worker process."""
    _die_with_parent()
    # Ctrl-C, and SIGTERM from timeout/Slurm/systemd, reach the whole process group: the main
    # process decides how to stop and shuts the workers down (they also exit if it dies).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def worker_deaths_held():
    """While opening or closing the output: a dying worker's SIGCHLD does not interrupt it (the
    loader still finds the dead worker at its next batch)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)


def shut_down(batches, urgent: bool = False) -> None:
    """Stop a DataLoader iterator's worker processes now. Dropping the iterator is not enough
    when an exception's traceback still holds a frame that refers to it. PyTorch asks each worker
    to finish and, after a few seconds each, terminates it; a worker that is still alive then
    (blocked in a read that ignores signals it does not die of) is killed. ``urgent`` (a run
    stopped by a signal, whose prefetched batches are dropped anyway): every worker is killed first,
    without PyTorch's wait (5 s, then 5 s more, for a worker stuck in a read)."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # PyTorch's multi-process iterator
    if shutdown is None:
        getattr(batches, "close", lambda: None)()  # a generator of batches (Ray's decoding tasks): its cleanup
        return
    if urgent:
        for worker in getattr(batches, "_workers", ()):
            if worker.is_alive():
                worker.kill()
    shutdown()
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the process that started it dies, even by SIGKILL,
    so no worker is left decoding for nobody."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: PyTorch's own watchdog ends orphaned workers at their next batch
