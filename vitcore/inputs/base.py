"""What every input kind shares: an input's key and identity, opening files safely, and the record
of a container or folder that could not be read to its end.

An input (a loose file, a tar member, a Parquet row; each kind's class is in its own module) has
a stored key, the root it is relative to, an identity (equal for the same input however it was
named; resume and merge recognise work already done by it) and open(), which gives its bytes as
a binary file object. Decoders read from that file object, never from a path. ``extras(names)``
gives the text kept beside it (--keep, --columns): name → text, or None where it has none.

Keys are stored as UTF-8. A name that is not valid UTF-8 is escaped reversibly: each
undecodable byte becomes ``\\xHH`` and a literal backslash becomes ``\\\\``
(``unescape_key`` reverses it).
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import stat
from dataclasses import dataclass, field
from typing import BinaryIO

from vitcore.errors import UsageError
from vitcore.inputs.remote import is_url, open_url, public_url, url_exists, url_is_dir, url_is_file, url_version


def path_identity(path: str, inside: str | None = None) -> bytes:
    """A file's normalised absolute path (equal however it was spelled: ./a, a, /abs/a); with
    ``inside``, that of an input inside the file (a tar member, a Parquet row) below it. An object
    in storage: its public URL (no credentials, no query), normalised the same way."""
    if is_url(path):
        scheme, _, rest = public_url(path).partition("://")
        rest = posixpath.join(rest, inside) if inside is not None else rest
        return f"{scheme}://{posixpath.normpath(rest)}".encode()
    identity = os.path.abspath(os.fsencode(path))
    return os.path.normpath(os.path.join(identity, os.fsencode(inside)) if inside is not None else identity)


def open_input(path: str) -> BinaryIO:
    """An input file's bytes: a local regular file (open_regular) or an object in storage (remote.open_url)."""
    return open_url(path) if is_url(path) else open_regular(path)


def file_version(path: str) -> tuple[int, object]:
    """(size, what changes when the file changes: its modification time, an object's ETag)."""
    if is_url(path):
        return url_version(path)
    stat_result = os.stat(path)
    return stat_result.st_size, stat_result.st_mtime_ns


def input_exists(path: str) -> bool:
    return url_exists(path) if is_url(path) else os.path.lexists(path)


def input_is_dir(path: str) -> bool:
    """A folder, or a prefix in storage with objects under it."""
    return url_is_dir(path) if is_url(path) else os.path.isdir(path)


def input_is_file(path: str) -> bool:
    return url_is_file(path) if is_url(path) else os.path.isfile(path)


def open_regular(path: str) -> BinaryIO:
    """A file's bytes. A missing or unreadable file, or anything that is not a regular file (a named
    pipe, a socket, a device), raises OSError at once. Opened without blocking, so a named pipe
    with no writer cannot stall a worker."""
    handle = open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK))
    try:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(f"not a regular file but {_kind(mode)}; only regular files are decoded")
        os.set_blocking(handle.fileno(), True)
        return handle  # .name is the path, for the decoders' messages
    except BaseException:
        handle.close()
        raise


def special_file(path: str) -> str | None:
    """What ``path`` is, in words, when it exists and is neither a regular file nor a folder (a named
    pipe, a socket, a device: never to be written, nor read as a file); None otherwise."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else _kind(mode)


class NotARegularFile(OSError):
    """An input that is a named pipe, a socket or a device: never read."""


def _kind(mode: int) -> str:
    for test, words in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                        (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return words
    return "not a file"


@dataclass(frozen=True)
class Unlisted:
    """A folder that could not be listed, or a container file (tar, Parquet) that could not be read
    to its end: what is in it was not (all) looked at. A failure record keyed ``<key>/``."""

    key: str  # relative to its root, ending in "/" ("./" for the root itself)
    root_index: int
    reason: str  # one line

    def identity(self, roots: list[str]) -> bytes:
        return identity_of(roots[self.root_index], self.key)


class PassedOver(UsageError):
    """A container file that holds no images of its kind (a Parquet file without an image column):
    refused when named, passed over (and counted, by its kind's passed_over_note) when found in a folder."""


class JsonText(str):
    """A --columns value that is not text, written as JSON; ``nonfinite`` counts the NaN and
    infinite numbers in it that JSON has no word for (written as null, and said in the summary)."""

    nonfinite = 0

    def __new__(cls, text: str, nonfinite: int = 0):
        made = super().__new__(cls, text)
        made.nonfinite = nonfinite
        return made

    def __reduce__(self):  # crosses from a decoding worker to the main process intact
        return (JsonText, (str(self), self.nonfinite))


# What discovery passes over that is not a file of another extension, by kind (the summary says each).
ENTRY_KINDS = {
    "folder_link_walked": "folder links not followed (a symlink loop, or a second link to a folder already walked)",
    "tar_directory": "directory entries inside tars",
    "tar_special": "links and special entries inside tars, not named as images",
}


@dataclass
class NotTaken:
    """What discovery passed over, counted: files and tar members by extension (--ext takes others),
    and entries that are not files by their kind (ENTRY_KINDS). Nothing is passed over unsaid."""

    by_extension: dict[str, int] = field(default_factory=dict)
    entries: dict[str, int] = field(default_factory=dict)

    def extension(self, ext: str) -> None:
        self.by_extension[ext] = self.by_extension.get(ext, 0) + 1

    def entry(self, kind: str) -> None:
        assert kind in ENTRY_KINDS, kind
        self.entries[kind] = self.entries.get(kind, 0) + 1


@dataclass
class Discovery:
    sources: list  # the inputs: files.Source, tar.TarMember, parquet.ParquetRow, …
    roots: list[str]  # absolute root directories; files named directly use the working directory
    skipped_duplicates: int = 0
    unlisted: list[Unlisted] = field(default_factory=list)  # folders whose contents are unknown
    containers: set = field(default_factory=set)  # identities of the container files read (tar, Parquet)
    empty: list[str] = field(default_factory=list)  # container files that hold no image, each "PATH holds no …"
    notes: list[str] = field(default_factory=list)  # what was passed over, counted (for the summary)
    input_notes: list[str] = field(default_factory=list)  # about inputs taken (odd --files-from lines), for the summary
    passed_over: dict[str, int] = field(default_factory=dict)  # extension → files in folders not taken (--ext)
    entries_passed_over: dict[str, int] = field(default_factory=dict)  # ENTRY_KINDS name → entries not taken
    image_columns: tuple[str, ...] = ()  # the columns the images inside container files are read from (Parquet)


def escape_key(name: str) -> str:
    """A filesystem name (str from os.fsdecode) → valid UTF-8 text, reversibly."""
    raw = os.fsencode(name)
    try:
        raw.decode("utf-8")
        if b"\\" not in raw:
            return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def unescape_key(key: str) -> bytes:
    """The inverse of escape_key: the original name as bytes."""
    out = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(key):
        out += key[pos : match.start()].encode("utf-8")
        token = match.group(1)
        out += b"\\" if token == "\\" else bytes([int(token[1:], 16)])
        pos = match.end()
    out += key[pos:].encode("utf-8")
    return bytes(out)


def source_path(root: str, key: str) -> bytes:
    """The file a (root, stored key) pair names (bytes: names need not be UTF-8)."""
    return os.path.join(os.fsencode(root), unescape_key(key))


def identity_of(root: str, key: str) -> bytes:
    """The input a stored (root, key) pair names, as Source.identity gives it: for files the
    normalised absolute path, equal however it was spelled (./a, a, /abs/a); for objects the URL."""
    if is_url(root):
        return path_identity(os.fsdecode(source_path(root, key)))
    return os.path.normpath(source_path(root, key))


class NamedBytes(io.BytesIO):
    """A container input's bytes; named in decoders' messages by its name, not by a memory address."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __repr__(self) -> str:
        return repr(self.name)
