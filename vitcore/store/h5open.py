"""Opening an HDF5 file with HDF5's own file lock where the file system has one.

HDF5 locks a file it opens (flock) so that no reader meets a write half-way. NFS without its lock
daemon and Lustre or GPFS mounted without flock refuse that lock ("unable to lock file, errno = 38,
error message = 'Function not implemented'", or errno 37 'No locks available'): the file is fine,
only the lock is missing. There the file is opened without it, as HDF5_USE_FILE_LOCKING=FALSE
would; one run per output is still kept by the run's own lock file (store/lock.py).

    h5_file(path, mode)       h5py.File, without HDF5's lock only where the file system has none
    locks_unsupported(err)    whether an OSError from h5py says the file system has no such locks
"""

from __future__ import annotations

import h5py

from vitcore.store.lock import NO_LOCKS


def locks_unsupported(err: OSError) -> bool:
    if isinstance(err, BlockingIOError):  # a lock that is held: another process has the file open
        return False
    text = str(err)
    return err.errno in NO_LOCKS or ("lock" in text and any(f"errno = {n}," in text for n in NO_LOCKS))


def h5_file(path, mode: str = "r") -> h5py.File:
    try:
        return h5py.File(path, mode)
    except OSError as err:
        if not locks_unsupported(err):
            raise
    return h5py.File(path, mode, locking=False)
