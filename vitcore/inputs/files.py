"""Loose files: the images found in folders (walked recursively) or named directly, one input each.

Each input gets a key: its path relative to the directory it was found under, or, for a file
named directly (argument or list line), the path exactly as given, relative to the working
directory. The roots (absolute) are recorded so ``root / key`` finds the original.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO, Callable

from vitcore.errors import UsageError
from vitcore.inputs.base import NotTaken, open_input, path_identity
from vitcore.inputs.remote import list_prefix


@dataclass(frozen=True)
class Source:
    """A loose file found in a folder or named in a list."""

    path: str  # filesystem path to open (str with surrogate escapes for non-UTF-8 bytes)
    key: str  # stored key: relative to its root, escaped to valid UTF-8
    root_index: int  # index into Discovery.roots

    def open(self) -> BinaryIO:
        """The input's bytes (a local file or an object in storage): a failure here is that input's failure record."""
        return open_input(self.path)

    @property
    def identity(self) -> bytes:
        """Equal to identity_of(its root, its key): the normalised absolute path."""
        return path_identity(self.path)

    def extras(self, names: tuple[str, ...]) -> dict[str, str | None]:
        """The text of the files beside it that share its name up to the first dot (WebDataset's
        sample rule: ``000001.jpg`` → ``000001.txt``), for ``--keep`` extensions; None where there is none."""
        folder, base = os.path.split(self.path)
        stem = base.partition(".")[0]
        out = {}
        for name in names:
            try:
                with open_input(os.path.join(folder, f"{stem}.{name}")) as handle:
                    out[name] = handle.read().decode("utf-8", "replace")
            except OSError:
                out[name] = None  # no such file beside it
        return out


def read_file_list(handle: BinaryIO) -> list[str]:
    """One path per line (bytes, so any file name survives); blank lines ignored, a UTF-8 byte-order
    mark (Windows editors write one) dropped. UTF-16 text (PowerShell's ``>`` writes it) is read as
    such; a list with NUL bytes otherwise is NUL-separated (``find -print0``: a path may hold a
    newline, never a NUL), unless they stand inside its lines (fewer NULs than newlines: refused)."""
    data = _from_utf16(handle.read()).removeprefix(b"\xef\xbb\xbf")
    if b"\0" in data:
        if data.count(b"\0") < data.count(b"\n"):
            raise UsageError("--files-from: the list has NUL bytes inside its lines, and no file name holds one (a "
                             "binary file?): give one path per line, or a NUL-separated list (find … -print0)")
        entries = [entry for entry in data.split(b"\0") if entry]
        if sorted(map(len, entries))[len(entries) // 2] <= 2:  # (a path of one or two letters, mostly: not a list)
            raise UsageError("--files-from: the list looks like UTF-16 text without a byte-order mark (split at its "
                             "NUL bytes it gives one- and two-letter paths): save it as UTF-8, one path per line")
        return [os.fsdecode(entry) for entry in entries]
    return [os.fsdecode(line.rstrip(b"\r")) for line in data.split(b"\n") if line.strip()]


def _from_utf16(data: bytes) -> bytes:
    """UTF-16 text → the same text as file-name bytes; other bytes as they are. Told by its byte-order
    mark, or without one by decoding whole, with no NUL character, into lines, or into one name where
    split at its NULs it would be one-letter names only (a path's letters: `/`, `.` and all, which a
    NUL-separated list would walk as folders)."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        codecs = ["utf-16"]
    elif b"\0" in data and len(data) % 2 == 0:  # ASCII in UTF-16: the NULs in the odd bytes (LE) or the even (BE)
        codecs = ["utf-16-le", "utf-16-be"] if data[1::2].count(0) >= data[0::2].count(0) else ["utf-16-be", "utf-16-le"]
    else:
        return data
    letters_only = all(len(entry) <= 1 for entry in data.split(b"\0"))
    for codec in codecs:
        try:
            text = data.decode(codec)
        except UnicodeDecodeError:
            continue
        if codec == "utf-16" or ("\0" not in text and ("\n" in text or letters_only)):
            return os.fsencode(text)
    return data


def walk_prefix(url: str, exts: tuple[str, ...], is_container: Callable[[str], bool], not_taken: NotTaken) -> list[str]:
    """A prefix in storage as walk() takes a folder: the objects under it with one of ``exts`` or that
    ``is_container`` takes (relative, sorted); the others counted by extension in ``not_taken``."""
    out = []
    for rel in list_prefix(url):
        name = rel.rpartition("/")[2]
        if ("." in name and name.rpartition(".")[2].lower() in exts) or is_container(name):
            out.append(rel)
        else:
            not_taken.extension(name.rpartition(".")[2].lower() if "." in name else "(no extension)")
    return out


def walk(root: str, exts: tuple[str, ...], seen_dirs: set[str], is_container: Callable[[str], bool],
         not_taken: NotTaken) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative paths of the files under root with one of ``exts`` or that ``is_container`` takes,
    each real directory visited once; and the folders that could not be listed, with the reason
    (relative path, one line). The other files are counted by extension, and the folder links
    not followed by kind, in ``not_taken``."""
    out: list[str] = []
    unreadable: list[tuple[str, str]] = []
    stack = [""]
    linked: list[str] = []  # folders reached through a symbolic link: walked after every real one,
    while stack or linked:  # so a folder is keyed by its own name, not by a link's that sorts first
        rel_dir = stack.pop() if stack else linked.pop(0)
        directory = os.path.join(root, rel_dir) if rel_dir else root
        real = os.path.realpath(directory)
        if real in seen_dirs:  # a symlink loop or a second link to a folder already walked
            if rel_dir:  # (a root given twice is the same input twice, not a link)
                not_taken.entry("folder_link_walked")
            continue
        seen_dirs.add(real)
        try:
            # Sorted, and sub-folders pushed in reverse below, so the walk order (and which name
            # wins for a folder reachable twice) never depends on the file system's listing order.
            entries = sorted(os.scandir(directory), key=lambda e: os.fsencode(e.name))
        except OSError as err:  # what is in it is unknown: said, not skipped
            reason = err.strerror or str(err)
            unreadable.append((rel_dir, f"{type(err).__name__}: cannot list this folder ({reason})"))
            continue
        subfolders = []
        for entry in entries:
            rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir and entry.is_symlink():
                linked.append(rel)
            elif is_dir:
                subfolders.append(rel)
            elif ("." in entry.name and entry.name.rpartition(".")[2].lower() in exts) or is_container(entry.name):
                out.append(rel)
            else:
                not_taken.extension(entry.name.rpartition(".")[2].lower() if "." in entry.name else "(no extension)")
        stack.extend(reversed(subfolders))
    return out, unreadable
