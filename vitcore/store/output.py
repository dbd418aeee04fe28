"""An output file's life in one run, in the order the workers require.

    with Output(path, resume, overwrite) as out:     checked, then locked (one run per output)
        state = out.resume_state(settings)           what a resumed file holds (None: a new file)
        out.prepare(settings, roots, keep_failures)  created, or truncated to its committed rows, and closed
        …the decoding workers fork (the run starts its loader)…
        writer = out.open_writer()                   only then: the file opens for writing
        …writer.put(rows)…
        out.finish(complete)

No writable handle may be inherited by a forked worker (a child's exit can flush or close it): the
file is closed after prepare() and opened again only by open_writer(), which a run calls once its
workers have forked. Nothing is written from the main thread while workers run (see
StoreWriter.prepare).
"""

from __future__ import annotations

import os

from vitcore.errors import OutputExistsError, UsageError
from vitcore.inputs.base import special_file
from vitcore.store.lock import LOCK_SUFFIX, OutputLock
from vitcore.store.resume import ResumeState, check_resumable, existing_file_problem
from vitcore.store.schema import StoreSettings
from vitcore.store.writer import BUILDING_SUFFIX, AsyncWriter, StoreWriter
from vitcore.system.workers import worker_deaths_held


class Output:
    def __init__(self, path: str, resume: bool = False, overwrite: bool = False):
        self.path, self.resume, self.overwrite = str(path), resume, overwrite
        self._lock = OutputLock(self.path)
        self._settings: StoreSettings | None = None
        self.writer: AsyncWriter | None = None

    @property
    def unlocked(self) -> bool:
        """The output's file system has no locks: the run went on without its own (said in its summary)."""
        return self._lock.unlocked

    def __enter__(self) -> "Output":
        check_output(self.path, self.resume, self.overwrite)
        self._lock.__enter__()  # released even if this process is killed
        try:
            check_output(self.path, self.resume, self.overwrite)  # again: another run may have made it meanwhile
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            writer, self.writer = self.writer, None
            if writer is not None:  # an error left it open: close what was committed
                try:
                    writer.close(False)
                except Exception:
                    if exc_type is None:
                        raise  # otherwise the error already on its way says more
        finally:
            self._lock.__exit__(exc_type, exc, traceback)

    @property
    def resuming(self) -> bool:
        return self.resume and os.path.exists(self.path)

    def resume_state(self, settings: StoreSettings) -> ResumeState | None:
        """What the file already holds when resuming (refusing other settings); None for a new file."""
        return check_resumable(self.path, settings) if self.resuming else None

    def prepare(self, settings: StoreSettings, roots: list[str], keep_failures: list[int] | None = None) -> None:
        """Before the workers fork: create the file, or truncate a resumed one to its committed rows."""
        StoreWriter.prepare(self.path, settings, roots, self.resuming, keep_failures)
        self._settings = settings

    def open_writer(self) -> AsyncWriter:
        """The prepared file, open for writing. Call it once the decoding workers have forked."""
        assert self._settings is not None, "prepare() the output before opening it for writing"
        with worker_deaths_held():  # no handle may be left open half-way
            self.writer = AsyncWriter(StoreWriter.reopen(self.path, self._settings))
        return self.writer

    def finish(self, complete: bool) -> StoreWriter | None:
        """Drain the writer, record completeness and close; the closed StoreWriter (its counts)."""
        writer, self.writer = self.writer, None
        if writer is None:
            return None
        writer.close(complete)
        return writer.writer


def _ancestors(folder: str) -> list[str]:
    """A folder and the folders above it, nearest first."""
    out = [folder]
    while os.path.dirname(out[-1]) != out[-1]:
        out.append(os.path.dirname(out[-1]))
    return out


SIDE_FILES = (LOCK_SUFFIX, BUILDING_SUFFIX)  # written beside an output: its lock, the file while it is made


def _check_name_length(path: str, folder: str) -> None:
    """The output's name, and the names of the files written beside it, fit the file system."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return
    name = os.fsencode(os.path.basename(path))
    longest = len(name) + max(len(suffix) for suffix in SIDE_FILES)
    if longest > limit:
        raise UsageError(f"the output name {os.path.basename(path)!r} is too long: file names here hold {limit} bytes, "
                         f"and vit-extract writes {' and '.join(SIDE_FILES)} files beside the output; "
                         f"shorten it by {longest - limit} bytes")


def output_target(path: str) -> str:
    """Where an output named ``path`` is written: through a symbolic link, its target (writing the
    name itself would replace the link and leave a stale file where the link pointed), else ``path``."""
    return os.path.realpath(path) if os.path.islink(path) else path


def read_as_output(output: str, reading) -> str | None:
    """The first of the files a command reads (``reading``) that is the very file ``output`` names
    (however either is spelled or linked): it must never be written. None when there is none."""
    if not os.path.exists(output):
        return None
    return next((str(path) for path in reading if os.path.exists(path) and os.path.samefile(path, output)), None)


def check_output(path: str, resume: bool, overwrite: bool, can_resume: bool = True) -> None:
    """Refuse early (before any model is built) an output that cannot or must not be written."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; choose one")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        blocking = next((p for p in _ancestors(folder) if os.path.exists(p) and not os.path.isdir(p)), None)
        if blocking is not None:
            raise UsageError(f"cannot write {path}: {blocking} is a file, not a folder")
        raise UsageError(f"the output folder {folder} does not exist")
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise UsageError(f"cannot write to the output folder {folder}: it is on a read-only file system")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to the output folder {folder} (permission denied)")
    _check_name_length(path, folder)
    if os.path.isdir(path):
        raise UsageError(f"the output {path} is a folder; give a file name such as {os.path.join(path, 'tokens.h5')}")
    special = special_file(path)
    if special is not None:  # /dev/null, a named pipe: replacing one with a file would break the system
        raise UsageError(f"the output {path} is {special}, not a regular file: give a file name "
                         "(it is not written, even with --overwrite)")
    for beside in (path + BUILDING_SUFFIX, path + LOCK_SUFFIX):  # the names a run writes beside its output
        special = special_file(beside)
        if special is not None:
            raise UsageError(f"{beside} is {special}, where a run writes a file of its own: remove it, or give "
                             "another -o")
    if os.path.exists(path) and not (resume or overwrite):
        problem = existing_file_problem(path) if can_resume else None  # (other commands write other kinds of file)
        kind, words = problem or (None, None)
        if words == "an empty file":
            raise OutputExistsError(f"{path} already exists (an empty file); add --overwrite to write over it")
        if kind == "not ours":
            raise OutputExistsError(f"{path} already exists and is not a vit-extract output ({words}): give another "
                                    "-o, or add --overwrite to replace it (what it holds is lost)")
        if kind is not None:  # damaged, or unreadable: --resume cannot continue it
            raise OutputExistsError(f"{path} already exists and is {words}, which --resume cannot continue: give "
                                    "another -o" + (", or add --overwrite to replace it" if kind == "damaged" else ""))
        hint = "add --resume to continue it or --overwrite to replace it" if can_resume else "add --overwrite to replace it"
        raise OutputExistsError(f"{path} already exists; {hint}")
