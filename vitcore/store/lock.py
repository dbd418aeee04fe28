"""One run per output file: an exclusive lock on ``OUT.lock`` for the whole run.

The lock is a POSIX record lock (fcntl.lockf): the kernel drops it the moment the process dies,
even by SIGKILL, so a stale lock file never blocks the next run; and unlike flock it is not
inherited by forked decoding workers, which may outlive a killed parent for a few seconds.
The file names the holder for the error message.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import time

from vitcore.errors import UsageError, VitExtractError


LOCK_SUFFIX = ".lock"
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)  # a file system without locks, not a held lock
UNLOCKED_NOTE = ("this file system has no file locks (NFS without its lock daemon?): nothing kept a second run from "
                 "writing the same output at the same time")


class OutputLockedError(VitExtractError):
    """Another live process is writing the same output."""


class OutputLock:
    def __init__(self, output: str):
        self.output = output
        self.path = output + LOCK_SUFFIX
        self.fd: int | None = None
        self.unlocked = False  # the file system has no locks: nothing keeps a second run out (said in the summary)

    def __enter__(self) -> "OutputLock":
        while True:
            try:
                fd = _open_lock_file(self.path, os.O_RDWR | os.O_CREAT)
            except OSError as err:
                raise VitExtractError(f"cannot create the lock file {self.path}: {err.strerror}") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in NO_LOCKS:  # NFS without its lock daemon: the run goes on, said (unlocked)
                    self.unlocked = True
                    break
                if err.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise VitExtractError(f"cannot lock {self.path}: {err.strerror}") from None
                refusal = _held(self.output, fd)
                os.close(fd)
                raise refusal from None
            # A finishing run unlinks the lock file: make sure ours is still the one at the path.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd = fd
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        try:  # who holds it, for a second run's message; the lock itself is already ours
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode())
        except OSError as err:
            self.__exit__()
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise VitExtractError(f"cannot write {self.path}: the disk is full; free some space first") from None
            raise VitExtractError(f"cannot write the lock file {self.path}: {err.strerror}") from None
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


def check_unlocked(output: str) -> None:
    """Refuse at once (before a model is built) an output another live run holds; the run takes the
    lock itself later (OutputLock), so this only makes the usual refusal quick. Leaves no trace."""
    holder = run_holding(output)
    if holder is not None:
        raise _refusal(output, holder)


def run_holding(output: str) -> str | None:
    """Who holds ``output``'s run lock ("pid 123 on host, started …"), when a live vit-extract run
    does; None when none does (a file held open by another program: HDF5's lock, not ours). Read
    only (a shared lock, tried and let go): another user's run, or a read-only mount, is seen too."""
    path = os.path.realpath(output) + LOCK_SUFFIX  # a run locks its output's target, not a link to it
    try:
        fd = _open_lock_file(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return None
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            return None
        return _holder(fd)
    finally:
        os.close(fd)


def _open_lock_file(path: str, flags: int) -> int:
    """A lock file's descriptor; never blocks (a named pipe left at its name would wait for a writer
    for ever): anything but a regular file there is refused, in words."""
    fd = os.open(path, flags | os.O_NONBLOCK, 0o644)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UsageError(f"{path} is not a regular file (a named pipe or a device), so it cannot be the run's lock "
                         "file: remove it, or give another -o")
    os.set_blocking(fd, True)
    return fd


def _held(output: str, fd: int) -> OutputLockedError:
    """The refusal for an output whose lock (open as ``fd``) another process holds, naming it."""
    return _refusal(output, _holder(fd))


def _holder(fd: int) -> str:
    """What the holding run wrote into its lock file (open as ``fd``): "pid 123 on host, started …"."""
    return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown process"


def _refusal(output: str, holder: str) -> OutputLockedError:
    return OutputLockedError(f"{output} is being written by another vit-extract run ({holder}); "
                             "wait for it to finish or stop it, then try again")
