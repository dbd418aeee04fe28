"""One run per output file: an exclusive lock on ``OUT.lock`` for the whole run.

The lock is a kernel flock, so a run that is killed (even by SIGKILL) releases it at once:
a stale lock file never blocks the next run. The file names the holder for the error message.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time

from vitcore.errors import VitExtractError


class OutputLockedError(VitExtractError):
    """Another live process is writing the same output."""


class OutputLock:
    def __init__(self, output: str):
        self.output = output
        self.path = output + ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown process"
                os.close(fd)
                raise OutputLockedError(
                    f"{self.output} is being written by another vit-extract run ({holder}); "
                    "wait for it to finish or stop it, then rerun with --resume"
                ) from None
            # A finishing run unlinks the lock file: make sure ours is still the one at the path.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding the lock (see the inode check above)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
