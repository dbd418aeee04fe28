"""Finding inputs: files, directories (recursive), file lists and stdin → a sorted, de-duplicated list.

An input is a Source: a stored key, the root it is relative to, an identity (equal for the same
input however it was named; resume and merge recognise work already done by it) and open(),
which gives its bytes as a binary file object. Decoders read from that file object, never from
a path, so the images inside tar shards and Parquet files (containers.py) stand beside the
folders and file lists here.

Each input gets a key: its path relative to the directory it was found under, or, for a
file named directly (argument or list line), the path exactly as given, relative to the
working directory. The roots (absolute) are recorded so ``root / key`` finds the original.

Keys are stored as UTF-8. A name that is not valid UTF-8 is escaped reversibly: each
undecodable byte becomes ``\\xHH`` and a literal backslash becomes ``\\\\``
(``unescape_key`` reverses it).
"""

from __future__ import annotations

import os
import re
import stat
import sys
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable

from vitcore.errors import UsageError

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass(frozen=True)
class Source:
    """A file found in a folder or named in a list (the only provider so far)."""

    path: str  # filesystem path to open (str with surrogate escapes for non-UTF-8 bytes)
    key: str  # stored key: relative to its root, escaped to valid UTF-8
    root_index: int  # index into Discovery.roots

    def open(self) -> BinaryIO:
        """The input's bytes (open_regular): a failure here is that input's failure record."""
        return open_regular(self.path)

    @property
    def identity(self) -> bytes:
        """Equal to identity_of(its root, its key): the normalised absolute path."""
        return path_identity(self.path)

    def extras(self, names: tuple[str, ...]) -> dict[str, str]:
        """The text of the files beside it that share its name up to the first dot (WebDataset's
        sample rule: ``000001.jpg`` → ``000001.txt``), for ``--keep`` extensions; "" where none."""
        folder, base = os.path.split(self.path)
        stem = base.partition(".")[0]
        out = {}
        for name in names:
            try:
                with open_regular(os.path.join(folder, f"{stem}.{name}")) as handle:
                    out[name] = handle.read().decode("utf-8", "replace")
            except OSError:
                out[name] = ""
        return out


def path_identity(path: str, inside: str | None = None) -> bytes:
    """A file's normalised absolute path (equal however it was spelled: ./a, a, /abs/a); with
    ``inside``, that of an input inside the file (a tar member, a Parquet row) below it."""
    identity = os.path.abspath(os.fsencode(path))
    return os.path.normpath(os.path.join(identity, os.fsencode(inside)) if inside is not None else identity)


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


@dataclass
class Discovery:
    sources: list[Source]
    roots: list[str]  # absolute root directories; files named directly use the working directory
    skipped_duplicates: int = 0
    unlisted: list[Unlisted] = field(default_factory=list)  # folders whose contents are unknown
    containers: set = field(default_factory=set)  # identities of the container files read (tar, Parquet)
    empty: list[str] = field(default_factory=list)  # container files that hold no image
    notes: list[str] = field(default_factory=list)  # what was passed over, counted (for the summary)


def parse_extensions(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"jpg,.PNG"`` → ("jpg", "png"); None → the defaults."""
    if text is None:
        return DEFAULT_EXTENSIONS
    parts = text.split(",") if isinstance(text, str) else list(text)
    exts = tuple(sorted({p.strip().lstrip(".").lower() for p in parts if p.strip().lstrip(".")}))
    if not exts:
        raise UsageError("--ext needs at least one extension, e.g. --ext jpg,png")
    return exts


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
    normalised absolute path, equal however it was spelled (./a, a, /abs/a)."""
    return os.path.normpath(source_path(root, key))


def read_file_list(handle: BinaryIO) -> list[str]:
    """One path per line (bytes, so any file name survives); blank lines ignored."""
    lines = handle.read().split(b"\n")
    return [os.fsdecode(line.rstrip(b"\r")) for line in lines if line.strip()]


def discover(
    paths: Iterable[str | os.PathLike] = (),
    files_from: str | os.PathLike | None = None,
    extensions: Iterable[str] | str | None = None,
    stdin: BinaryIO | None = None,
    containers=None,
) -> Discovery:
    """Every input image, in a deterministic order: roots in the order given, keys sorted within
    each, the images inside a container file in the container's order, where its name sorts.

    Directories are walked recursively (symlinked directories followed once; loops are harmless)
    and filtered by extension; files named directly are taken whatever their extension. Tar shards
    and Parquet files (containers.py), named or found in folders, give one input per image inside;
    ``containers`` (containers.ContainerOptions) says which sidecars and columns travel with them.
    A name with braces that does not exist as written is expanded (``{00000..00099}.tar``).
    """
    from vitcore.containers import ContainerOptions, NoImageColumn, container_kind, expand_braces

    exts = parse_extensions(extensions)
    options = containers or ContainerOptions()
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]  # one path, not a sequence of characters
    named = [(os.fspath(p), False) for p in paths]  # (path, came from a list)
    if files_from is not None:
        if os.fspath(files_from) == "-":
            listed = read_file_list(stdin or sys.stdin.buffer)
        else:
            try:
                with open(files_from, "rb") as handle:
                    listed = read_file_list(handle)
            except OSError as err:
                raise UsageError(f"cannot read --files-from {files_from}: {err.strerror}") from None
        named += [(p, True) for p in listed]
    if not named:
        raise UsageError("no inputs: give image files or folders, or --files-from FILE (- for stdin)")
    named = [(name, listed) for given, listed in named for name in expand_braces(given)]

    cwd = os.getcwd()
    roots: list[str] = []
    found: list[tuple[int, bytes, int, object]] = []  # (root index, key as bytes, place in its container, input)
    unlisted: list[Unlisted] = []

    def root_index(root: str) -> int:
        if root not in roots:
            roots.append(root)
        return roots.index(root)

    containers: set[bytes] = set()
    empty: list[str] = []
    no_images: list[str] = []  # Parquet files found in folders without an image column

    def take(index: int, key: str, path: str, named: bool) -> None:
        """One file: an image, or a container whose images are taken in its order."""
        kind = container_kind(path)
        if kind is None or os.path.isdir(path) or not os.path.lexists(path):  # a listed file that is gone:
            found.append((index, os.fsencode(key), 0, Source(path=path, key=escape_key(key), root_index=index)))
            return                                                            # its own failure record
        containers.add(path_identity(path))
        try:
            inside, problem = _scan_container(kind, path, key, index, exts, options)
        except NoImageColumn:
            if named:
                raise
            no_images.append(key)
            return
        found.extend((index, os.fsencode(key), place, source) for place, source in enumerate(inside))
        if problem is not None:
            unlisted.append(problem)
        elif not inside:
            empty.append(path)

    seen_dirs: set[str] = set()
    for given, listed in named:
        if os.path.isdir(given):
            root = os.path.abspath(given)
            index = root_index(root)
            files, unreadable = _walk(root, exts, seen_dirs)
            for rel in files:
                take(index, rel, os.path.join(root, rel), named=False)
            unlisted += [Unlisted(escape_key(os.path.join(rel, "") if rel else "./"), index, reason)
                         for rel, reason in unreadable]
        elif os.path.lexists(given) or listed:
            # Named files are taken as given; a listed one that is missing becomes a failure record.
            take(root_index(cwd), given, given, named=True)
        else:
            raise UsageError(f"input {given} does not exist")

    sources: list = []
    seen: set[bytes] = set()
    duplicates = 0
    for *_, source in sorted(found, key=lambda item: item[:3]):
        if source.identity in seen:
            duplicates += 1
            continue
        seen.add(source.identity)
        sources.append(source)
    notes = []
    if no_images:
        shown = ", ".join(no_images[:3]) + (" …" if len(no_images) > 3 else "")
        notes.append(f"{len(no_images)} Parquet files in the folders have no column of image bytes and were passed "
                     f"over ({shown}; img2dataset writes such metadata files beside its tars)")
    return Discovery(sources=sources, roots=roots, skipped_duplicates=duplicates, unlisted=unlisted,
                     containers=containers, empty=empty, notes=notes)


def _scan_container(kind: str, path: str, key: str, index: int, exts, options):
    """(the images inside a container file, a record of what could not be read or None)."""
    from vitcore.containers import scan_parquet, scan_tar

    if kind == "compressed-tar":
        where = escape_key(os.path.join(key, ""))
        return [], Unlisted(where, index, "compressed tar: members cannot be read by offset; decompress it "
                                          "first (gunzip, unxz, …) and give the .tar")
    if kind == "tar":
        return scan_tar(path, key, index, exts, options.keep)
    return scan_parquet(path, key, index, options)


def _walk(root: str, exts: tuple[str, ...], seen_dirs: set[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative paths of matching files under root, each real directory visited once; and the
    folders that could not be listed, with the reason (relative path, one line)."""
    from vitcore.containers import container_kind

    out: list[str] = []
    unreadable: list[tuple[str, str]] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        directory = os.path.join(root, rel_dir) if rel_dir else root
        real = os.path.realpath(directory)
        if real in seen_dirs:
            continue  # a symlink loop or a second link to a folder already walked
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
            if is_dir:
                subfolders.append(rel)
            elif ("." in entry.name and entry.name.rpartition(".")[2].lower() in exts) or container_kind(entry.name):
                out.append(rel)
        stack.extend(reversed(subfolders))
    return out, unreadable
