"""WebDataset tar shards: each image member is one input, read by offset after one scan of the
tar's headers (standard library tarfile, no decompression), so batches, --shard, torchrun ranks
and --resume work member by member exactly as for loose files.

Keys: the tar's key as a loose file's would be, then ``/`` and the member's name
(``00001.tar/000010005.jpg``), so a key's identity (root / key) is unique and stable like a file's.

WebDataset samples: members sharing a name up to the first dot of the base name are one sample
(``000010005.jpg``, ``000010005.txt``, ``000010005.json``); ``--keep txt,json`` stores the sample's
members of those extensions beside its image, as UTF-8 text (``""`` where a sample has none).

Compressed tars (.tar.gz, .tgz, .tar.bz2, .tar.xz, .tar.zst, or a .tar that is really compressed)
cannot be read by offset: each is a failure record asking for it to be decompressed first.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass
from typing import BinaryIO

from vitcore.inputs.base import NamedBytes, Unlisted, escape_key, open_regular, path_identity

SUFFIXES = (".tar",)
# A tar compressed as a whole, by its name's ending or its first bytes → the compression.
COMPRESSED_SUFFIXES = {".tar.gz": "gzip", ".tgz": "gzip", ".tar.bz2": "bzip2", ".tbz2": "bzip2", ".tar.xz": "xz",
                       ".txz": "xz", ".tar.zst": "zstd", ".tar.zstd": "zstd"}
COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
# WebDataset's split of a member name: everything up to the first dot of the base name is the sample.
SAMPLE_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def claims(name: str) -> bool:
    """A tar by its name's ending (a compressed one too: it becomes a failure record)."""
    return name.lower().endswith(SUFFIXES + tuple(COMPRESSED_SUFFIXES))


def holds_nothing(path: str, exts: tuple[str, ...]) -> str:
    return f"{path} holds no image (looked for {', '.join(exts)} members)"


def _compression(name: str) -> str | None:
    lower = name.lower()
    return next((kind for suffix, kind in COMPRESSED_SUFFIXES.items() if lower.endswith(suffix)), None)


class CompressedTar(OSError):
    """A tar compressed as a whole: its members have no offsets to read them by."""

    def __init__(self, compression: str):
        super().__init__(f"compressed tar ({compression}): members cannot be read by offset; "
                         f"decompress it first (e.g. {compression} -d) and give the .tar")


@dataclass(frozen=True)
class TarMember:
    """An image member of a tar shard, with its sample's sidecar members."""

    path: str  # the tar file, as opened
    member: str  # the member's name inside it
    key: str  # stored key: the tar's key + "/" + the member's name, escaped to valid UTF-8
    root_index: int
    offset: int  # where its data starts in the tar
    size: int
    sidecars: tuple[tuple[str, int, int], ...] = ()  # (extension, offset, size) of the sample's kept members
    problem: str | None = None  # why it cannot be read (a link, not a file), or None

    def open(self) -> BinaryIO:
        if self.problem is not None:
            raise OSError(self.problem)
        return NamedBytes(_read_range(self.path, self.offset, self.size, self.member), self.member)

    @property
    def identity(self) -> bytes:
        return path_identity(self.path, member_key(self.member))

    def extras(self, names: tuple[str, ...]) -> dict[str, str | None]:
        found = {ext: (offset, size) for ext, offset, size in self.sidecars}
        out = {}
        for name in names:
            if name in found:
                offset, size = found[name]
                out[name] = _read_range(self.path, offset, size, name).decode("utf-8", "replace")
            else:
                out[name] = None  # the sample has no member of that extension
        return out


def member_key(name: str) -> str:
    """A member's name as its key ends: normalised (``./000.jpg`` → ``000.jpg``), and always inside
    the tar (a leading ``/`` or ``../`` is dropped), so that its identity is unique to the tar."""
    parts = [p for p in posixpath.normpath("/" + name).split("/") if p]  # "/" first: ".." cannot climb out
    return "/".join(parts)


def _read_range(path: str, offset: int, size: int, what: str) -> bytes:
    with open_regular(path) as handle:
        handle.seek(offset)
        data = handle.read(size)
    if len(data) != size:
        raise OSError(f"the tar is cut short: {what} has {len(data)} of its {size} bytes")
    return data


def scan(path: str, key: str, root_index: int, exts: tuple[str, ...], options, passed_over: dict[str, int]):
    """The image members of a tar shard, in the tar's order, and a record of what could not be
    scanned (a compressed or damaged tar, one cut short), or None. Members that are neither images
    (``exts``) nor kept sidecars (``options.keep``) are counted by extension in ``passed_over``.

    Members are taken as ``tar x`` would write them: a name met twice (or two names that are the
    same path, ``./a.jpg`` and ``a.jpg``) is one member, the later one."""
    where = escape_key(os.path.join(key, ""))
    keep = options.keep
    compression = _compression(path)
    if compression:  # by its name: nothing is read from it
        return [], Unlisted(where, root_index, str(CompressedTar(compression)))
    try:
        members, problem = tar_members(path)
    except CompressedTar as err:
        return [], Unlisted(where, root_index, str(err))
    except OSError as err:
        return [], Unlisted(where, root_index, f"{type(err).__name__}: cannot read this tar ({err.strerror or err})")
    latest: dict[str, tarfile.TarInfo] = {}
    for info in members:  # in the tar's order, each name where it was last written
        latest.pop(member_key(info.name), None)
        latest[member_key(info.name)] = info
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    for name, info in latest.items():
        match = SAMPLE_NAME.match(name)
        if match and info.isfile():
            samples.setdefault(match.group(1), {})[match.group(2).lower()] = (info.offset_data, info.size)
    sources = []
    for name, info in latest.items():
        match = SAMPLE_NAME.match(name)
        ext = match.group(2).rpartition(".")[2].lower() if match else "(no extension)"
        if ext not in exts:
            if info.isfile() and not (match and match.group(2).lower() in keep):
                passed_over[ext] = passed_over.get(ext, 0) + 1
            continue
        kept = samples.get(match.group(1), {})
        sidecars = tuple((ext, *kept[ext]) for ext in keep if ext in kept)
        reason = None if info.isfile() else "a link or special entry inside the tar, not a file"
        sources.append(TarMember(path=path, member=info.name, key=escape_key(os.path.join(key, name)),
                                 root_index=root_index, offset=info.offset_data, size=info.size,
                                 sidecars=sidecars, problem=reason))
    record = Unlisted(where, root_index, problem) if problem else None
    return sources, record


@functools.lru_cache(maxsize=8)
def _scan(path: str, size: int, mtime: int) -> tuple[tuple[tarfile.TarInfo, ...], str | None]:
    with open_regular(path) as handle:
        head = handle.read(6)
        for magic, compression in COMPRESSION_MAGIC.items():
            if head.startswith(magic):
                raise CompressedTar(compression)
        handle.seek(0)
        members, problem = _tar_members(handle)
    return tuple(members), problem


def tar_members(path: str) -> tuple[tuple[tarfile.TarInfo, ...], str | None]:
    """A tar's member headers and what is wrong with it, if anything (one scan per file version)."""
    stat = os.stat(path)
    return _scan(path, stat.st_size, stat.st_mtime_ns)


def _tar_members(handle) -> tuple[list[tarfile.TarInfo], str | None]:
    """Every member's header (one pass over the headers; the data is skipped, not read), and what
    was wrong with the tar, if anything. Zero blocks are read through (``tar -i``), so tars joined
    with ``cat`` give all their members; the end-of-archive blocks must follow the last member,
    or the tar was cut short (tarfile itself stops there without a word)."""
    members: list[tarfile.TarInfo] = []
    try:
        archive = tarfile.open(fileobj=handle, mode="r:", ignore_zeros=True)
    except tarfile.ReadError as err:
        return [], f"ReadError: not a readable tar ({err})"
    try:
        while True:
            info = archive.next()
            if info is None:
                break
            members.append(info)
    except tarfile.ReadError as err:
        last = members[-1].name if members else "its start"
        if "unexpected end" in str(err):
            return members, f"the tar is cut short in or after {last}: the members after it are missing"
        return members, f"ReadError: the tar is damaged after {last} ({err}); the members after it were not read"
    end = members[-1].offset_data + -(-members[-1].size // 512) * 512 if members else 0
    handle.seek(end)
    marker = handle.read(512)
    if len(marker) < 512 or marker.strip(b"\0"):
        last = members[-1].name if members else "its start"
        return members, (f"the tar ends without its end-of-archive marker after {last}: it was cut short, "
                         "and any members after that are missing")
    return members, None


def open_inside(container: str, inner: str, options) -> BinaryIO:
    """The bytes of member ``inner`` of a tar (the last of that name, as a run takes it)."""
    members, _ = tar_members(container)
    for info in reversed(members):
        if member_key(info.name) == inner and info.isfile():
            return NamedBytes(_read_range(container, info.offset_data, info.size, inner), inner)
    raise FileNotFoundError(f"{container} holds no member {inner}")
