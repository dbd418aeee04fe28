"""The user's cache folder, and weights digests remembered there.

Hashing a checkpoint's vision tensors (a 2B-shape Qwen-VL: over a gigabyte) took 10–12 s at the
start of every run. A digest is now kept per file identity: the files' real paths, devices, inodes,
sizes and modification and change times (ctime: set by the kernel on every write or rename, never by
the user). A file rewritten, replaced, moved or touched has another identity and is hashed again,
so a resume still refuses other weights; an unchanged file is not read at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Callable, Iterable

CACHE_ENV = "VIT_EXTRACT_CACHE_DIR"  # overrides where the cache is kept
DIGESTS = "digests"  # sub-folder: one small JSON file per remembered digest


def cache_dir() -> str:
    """$VIT_EXTRACT_CACHE_DIR, else $XDG_CACHE_HOME/vit-extract, else ~/.cache/vit-extract."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vit-extract")


def file_identity(path: str) -> list:
    stat = os.stat(path)
    return [os.path.realpath(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def weights_files(path: str) -> list[str]:
    """What a digest of ``path`` depends on: the file, or every regular file directly in the folder
    (its shards, index and configs; a change to any of them hashes again)."""
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))


def known_digest(kind: str, files: Iterable[str]) -> str | None:
    """The digest remembered for these files as they are now, or None (then they must be hashed)."""
    try:
        return _remembered(kind, [file_identity(f) for f in files])
    except OSError:
        return None


def _record_path(kind: str, identities: list) -> str:
    key = hashlib.sha256(json.dumps([kind, *identities]).encode()).hexdigest()
    return os.path.join(cache_dir(), DIGESTS, key + ".json")


def _remembered(kind: str, identities: list) -> str | None:
    record = read_json(_record_path(kind, identities))
    return record["sha256"] if record.get("kind") == kind and isinstance(record.get("sha256"), str) else None


def cached_digest(kind: str, files: Iterable[str], compute: Callable[[], str]) -> str:
    """``compute()``, remembered for these files as they are now (see the module's docstring).
    ``kind`` names what is digested (a family's rule), so two rules over one file never mix."""
    files = list(files)
    try:
        before = [file_identity(f) for f in files]
    except OSError:
        return compute()  # a file that cannot be stat'ed: hash (and let compute() say what is wrong)
    known = _remembered(kind, before)
    if known is not None:
        return known
    digest = compute()
    try:
        unchanged = [file_identity(f) for f in files] == before  # not written while it was hashed
    except OSError:
        unchanged = False
    if unchanged:
        write_json(_record_path(kind, before), {"kind": kind, "files": [os.path.realpath(f) for f in files], "sha256": digest})
    return digest


def read_json(path: str) -> dict:
    """A cache file's measurements (key → entry); {} when there is none yet, or it is unreadable or damaged."""
    try:
        with open(path) as handle:
            known = json.load(handle)
        return known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return {}  # measure again


def write_json(path: str, known: dict) -> None:
    """Best effort, replaced whole: a cache folder that cannot be written only means measuring again next time."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            json.dump(known, out, indent=1, sort_keys=True)
        os.replace(partial, path)
    except OSError:
        pass
