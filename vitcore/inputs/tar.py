"""WebDataset tar shards: each image member is one input, read by offset after one scan of the
tar's headers (standard library tarfile, no decompression), so batches, --shard, torchrun ranks
and --resume work member by member exactly as for loose files.

Keys: the tar's key as a loose file's would be, then ``/`` and the member's name
(``00001.tar/000010005.jpg``), so a key's identity (root / key) is unique and stable like a file's.

WebDataset samples: members sharing a name up to the first dot of the base name are one sample
(``000010005.jpg``, ``000010005.txt``, ``000010005.json``); ``--keep txt,json`` stores the sample's
members of those extensions beside its image, as UTF-8 text (``""`` where a sample has none).

Links: a hard link or symbolic link member is read as the member it names, as ``tar x`` would
make it (a link to nothing in the tar is a failure record). Directory and other entries that are
not files, and files that are neither images nor kept sidecars, are counted in the summary.

Compressed tars (webdataset writes .tar.gz; also .tgz, .tar.bz2, .tar.xz), told by their first
bytes, not their name: gzip, bzip2 and xz are read by decompressing the stream (no member has an
offset in the file). Discovery decompresses each once to list its members; each process that reads
members keeps one stream open per tar and reads forward, so reading in the tar's order costs one
pass per decoding worker, and going back (a member before the last one read) starts again from the
beginning. zstd is not in Python's standard library: such a tar is a failure record asking for it
to be decompressed first.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import lzma
import os
import posixpath
import re
import tarfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from vitcore.inputs.base import NamedBytes, NotTaken, Unlisted, escape_key, file_version, open_input, path_identity

SUFFIXES = (".tar",)
# Names taken as tars (what they hold is told by their first bytes, COMPRESSION_MAGIC).
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.zstd")
COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
# The compressions read as a stream, by the standard library's decompressors (seekable forwards).
STREAMS = {"gzip": lambda f: gzip.GzipFile(fileobj=f, mode="rb"), "bzip2": bz2.BZ2File, "xz": lzma.LZMAFile}
STREAM_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError, tarfile.ReadError)  # a damaged or cut stream
# WebDataset's split of a member name: everything up to the first dot of the base name is the sample.
SAMPLE_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def claims(name: str) -> bool:
    """A tar by its name's ending (compressed or not: its first bytes tell)."""
    return name.lower().endswith(SUFFIXES + COMPRESSED_SUFFIXES)


def holds_nothing(path: str, exts: tuple[str, ...]) -> str:
    return f"{path} holds no image (looked for {', '.join(exts)} members)"


class CompressedTar(OSError):
    """A tar compressed with what the standard library cannot decompress (zstd)."""

    def __init__(self, compression: str):
        super().__init__(f"compressed tar ({compression}): vit-extract reads gzip, bzip2 and xz tars, not "
                         f"{compression}; decompress it first (e.g. {compression} -d) and give the .tar")


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
    problem: str | None = None  # why it cannot be read (a link to nothing, not a file), or None
    compression: str | None = None  # gzip, bzip2, xz: offsets are in the decompressed stream

    def open(self) -> BinaryIO:
        if self.problem is not None:
            raise OSError(self.problem)
        if self.compression is None:
            return NamedBytes(_read_range(self.path, self.offset, self.size, self.member), self.member)
        # The sample's sidecars are read in the same forward pass (one may lie before the image).
        wanted = [(self.offset, self.size), *((offset, size) for _, offset, size in self.sidecars)]
        data = _stream_ranges(self.path, self.compression, wanted, self.member, required=self.offset)
        _LAST_SAMPLE.clear()  # a sidecar the stream could not give (cut short after the image): absent
        _LAST_SAMPLE.update({(self.path, offset): data.get(offset) for offset, _ in wanted[1:]})
        return NamedBytes(data[self.offset], self.member)

    @property
    def identity(self) -> bytes:
        return path_identity(self.path, member_key(self.member))

    def extras(self, names: tuple[str, ...]) -> dict[str, str | None]:
        found = {ext: (offset, size) for ext, offset, size in self.sidecars}
        out = {}
        for name in names:
            if name in found:
                offset, size = found[name]
                try:
                    if self.compression is None:
                        data = _read_range(self.path, offset, size, name)
                    elif (self.path, offset) in _LAST_SAMPLE:
                        data = _LAST_SAMPLE[(self.path, offset)]
                    else:
                        data = _stream_ranges(self.path, self.compression, [(offset, size)], name)[offset]
                except OSError:  # cut short before the sidecar: the image is kept, its text absent
                    data = None
                out[name] = None if data is None else data.decode("utf-8", "replace")
            else:
                out[name] = None  # the sample has no member of that extension
        return out


def member_key(name: str) -> str:
    """A member's name as its key ends: normalised (``./000.jpg`` → ``000.jpg``), and always inside
    the tar (a leading ``/`` or ``../`` is dropped), so that its identity is unique to the tar."""
    parts = [p for p in posixpath.normpath("/" + name).split("/") if p]  # "/" first: ".." cannot climb out
    return "/".join(parts)


def _read_range(path: str, offset: int, size: int, what: str) -> bytes:
    with open_input(path) as handle:
        handle.seek(offset)
        data = handle.read(size)
    if len(data) != size:
        raise OSError(f"the tar is cut short: {what} has {len(data)} of its {size} bytes")
    return data


def scan(path: str, key: str, root_index: int, exts: tuple[str, ...], options, not_taken: NotTaken):
    """The image members of a tar shard, in the tar's order, and a record of what could not be
    scanned (a damaged tar, one cut short, one compressed with zstd), or None. Members that are
    neither images (``exts``) nor kept sidecars (``options.keep``) are counted by extension, and
    entries that are not files by kind, in ``not_taken``.

    Members are taken as ``tar x`` would write them: a name met twice (or two names that are the
    same path, ``./a.jpg`` and ``a.jpg``) is one member, the later one; a link is the member it names."""
    where = escape_key(os.path.join(key, ""))
    keep = options.keep
    try:
        tree, problem, compression = tar_members(path)
    except CompressedTar as err:
        return [], Unlisted(where, root_index, str(err))
    except OSError as err:
        return [], Unlisted(where, root_index, f"{type(err).__name__}: cannot read this tar ({err.strerror or err})")
    # Every sample member resolved once: the file it is (a sidecar may be a link too), or why not.
    resolved = {name: tree.file(name) for name in tree.latest if SAMPLE_NAME.match(name)}
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    for name, (target, _) in resolved.items():
        if target is not None:
            match = SAMPLE_NAME.match(name)
            samples.setdefault(match.group(1), {})[match.group(2).lower()] = (target.offset_data, target.size)
    # A compressed stream is checked as a whole (gzip's CRC at its end): what was read before the
    # check failed may be wrong bytes that decoded anyway.
    untrusted = (f"the {compression} stream fails its integrity check, so no member of it can be trusted"
                 if compression and problem and "damaged" in problem else None)
    sources = []
    for name, info in tree.latest.items():
        match = SAMPLE_NAME.match(name)
        ext = match.group(2).rpartition(".")[2].lower() if match else "(no extension)"
        if ext not in exts:
            if info.isdir():
                not_taken.entry("tar_directory")
            elif not info.isfile():
                not_taken.entry("tar_special")
            elif not (match and match.group(2).lower() in keep):
                # a kept extension that is no sample's sidecar here (a.b.txt beside a.jpg keeps "b.txt")
                not_taken.extension(ext if ext not in keep else f"{ext}, not a sidecar")
            continue
        kept = samples.get(match.group(1), {})
        sidecars = tuple((ext, *kept[ext]) for ext in keep if ext in kept)
        target, reason = resolved[name]
        sources.append(TarMember(path=path, member=info.name, key=escape_key(os.path.join(key, name)),
                                 root_index=root_index, offset=target.offset_data if target else 0,
                                 size=target.size if target else 0, sidecars=sidecars, problem=untrusted or reason,
                                 compression=compression))
    record = Unlisted(where, root_index, problem) if problem else None
    return sources, record


class _Extracted:
    """A tar's members as ``tar x`` leaves them on disk: each name its last entry; a hard link the
    file its target was when the link was written (a later entry of that name does not change it);
    a symbolic link followed like a path, through links to folders too, never out of the tar."""

    def __init__(self, members):
        self.latest: dict[str, tarfile.TarInfo] = {}
        self.hard: dict[str, tarfile.TarInfo | None] = {}  # hard link → the file it was made to
        for info in members:  # in the tar's order
            name = member_key(info.name)
            if info.islnk():
                target = member_key(info.linkname)
                self.hard[name] = self.hard.get(target) if target in self.hard else (
                    self.latest[target] if target in self.latest and self.latest[target].isfile() else None)
            else:
                self.hard.pop(name, None)
            self.latest.pop(name, None)
            self.latest[name] = info

    def file(self, name: str) -> tuple[tarfile.TarInfo | None, str | None]:
        """The file member ``name`` is, or None and why it cannot be read."""
        path, hops = name, 0
        while True:
            parts = path.split("/")
            for i in range(1, len(parts) + 1):
                prefix = "/".join(parts[:i])
                info = self.latest.get(prefix)
                if info is None:
                    if i == len(parts):
                        return None, f"a link to {path}, which is not a file in this tar"
                    continue  # a folder the tar does not list (tars need not)
                if info.issym():
                    hops += 1
                    if hops > 16:
                        return None, "a loop of symbolic links inside the tar"
                    if info.linkname.startswith("/"):
                        return None, f"a symbolic link to {info.linkname}, outside the tar"
                    path = member_key(posixpath.join(posixpath.dirname(prefix), info.linkname, *parts[i:]))
                    break  # resolve the new path from its start
                if i < len(parts):
                    continue  # a folder entry on the way
                if info.islnk():
                    target = self.hard.get(prefix)
                    if target is None:
                        return None, f"a hard link to {info.linkname}, which is not a file in this tar"
                    return target, None
                if info.isfile():
                    return info, None
                return None, "a directory or special entry inside the tar, not a file"


@functools.lru_cache(maxsize=8)
def _scan(path: str, size: int, version) -> tuple[_Extracted, str | None, str | None]:
    with open_input(path) as handle:
        head = handle.read(6)
        compression = next((kind for magic, kind in COMPRESSION_MAGIC.items() if head.startswith(magic)), None)
        handle.seek(0)
        if compression is None:
            members, problem = _tar_members(handle)
        elif compression not in STREAMS:
            raise CompressedTar(compression)
        else:
            with STREAMS[compression](handle) as stream:
                members, problem = _tar_members(stream, compression)
    return _Extracted(members), problem, compression


def tar_members(path: str) -> tuple[_Extracted, str | None, str | None]:
    """A tar's members as ``tar x`` leaves them, what is wrong with it if anything, and its
    compression (None, or gzip, bzip2, xz: offsets are then in the decompressed stream); one scan
    per file version."""
    return _scan(path, *file_version(path))


# -- compressed tars, read forwards --------------------------------------------------------------
# One decompressing stream per tar in each process (a forked worker opens its own), and the
# sidecars read with the last image (TarMember.open), for its extras().
_STREAMS_OPEN: dict = {"pid": None, "streams": {}}
_LAST_SAMPLE: dict[tuple[str, int], bytes] = {}
STREAMS_KEPT = 2  # a worker reads one tar at a time; the one before may still have members to give


def close_readers() -> None:
    """Close this process's compressed-tar streams (a run's end; a worker's streams end with it)."""
    for opened in _STREAMS_OPEN["streams"].values():
        _close(opened)
    _STREAMS_OPEN["streams"] = {}
    _LAST_SAMPLE.clear()


def _close(opened: tuple) -> None:
    """A (file, decompressing stream) pair, closed."""
    handle, stream = opened
    stream.close()
    handle.close()


def _stream_ranges(path: str, compression: str, ranges: list[tuple[int, int]], what: str,
                   required: int | None = None) -> dict[int, bytes]:
    """The bytes at (offset, size) of a compressed tar's stream, read in offset order → {offset: bytes}.
    With ``required``, a range after it that the stream cannot give is left out rather than failing
    (a sidecar past the point where a shard was cut); without, every range is required."""
    if _STREAMS_OPEN["pid"] != os.getpid():  # inherited through fork: not ours to read from
        _STREAMS_OPEN.update(pid=os.getpid(), streams={})
    streams = _STREAMS_OPEN["streams"]
    key = (path, *file_version(path))
    if key not in streams:
        while len(streams) >= STREAMS_KEPT:
            _close(streams.pop(next(iter(streams))))
        handle = open_input(path)
        streams[key] = (handle, STREAMS[compression](handle))
    stream = streams[key][1]
    out: dict[int, bytes] = {}
    for offset, size in sorted(set(ranges)):
        try:
            stream.seek(offset)  # forwards: decompress and skip; backwards: from the start again
            data = stream.read(size)
            if len(data) != size:
                raise EOFError(f"{len(data)} of {size} bytes")
        except STREAM_ERRORS as err:
            _close(streams.pop(key))
            if required is None or required not in out:
                raise OSError(f"the {compression} tar is cut short or damaged at {what}: {err}") from None
            return out  # what came before the break (the image); the rest is absent
        out[offset] = data
    return out


def _tar_members(handle, compression: str | None = None) -> tuple[list[tarfile.TarInfo], str | None]:
    """Every member's header (one pass over the headers; the data is skipped, not read), and what
    was wrong with the tar, if anything. Zero blocks are read through (``tar -i``), so tars joined
    with ``cat`` give all their members; the end-of-archive blocks must follow the last member,
    or the tar was cut short (tarfile itself stops there without a word)."""
    members: list[tarfile.TarInfo] = []
    try:
        archive = tarfile.open(fileobj=handle, mode="r:", ignore_zeros=True)
    except (tarfile.ReadError, *(STREAM_ERRORS if compression else ())) as err:
        return [], f"{type(err).__name__}: not a readable {compression + ' ' if compression else ''}tar ({err})"
    try:
        while True:
            info = archive.next()
            if info is None:
                break
            members.append(info)
    except (tarfile.ReadError, *(STREAM_ERRORS if compression else ())) as err:
        last = members[-1].name if members else "its start"
        if "unexpected end" in str(err) or isinstance(err, EOFError):
            return members, f"the tar is cut short in or after {last}: the members after it are missing"
        return members, (f"{type(err).__name__}: the {compression + ' ' if compression else ''}tar is damaged "
                         f"after {last} ({err}); the members after it were not read")
    end = members[-1].offset_data + -(-members[-1].size // 512) * 512 if members else 0
    try:
        handle.seek(end)
        marker = handle.read(512)
    except STREAM_ERRORS:  # a compressed stream that ends early
        marker = b""
    if len(marker) < 512 or marker.strip(b"\0"):
        last = members[-1].name if members else "its start"
        return members, (f"the tar ends without its end-of-archive marker after {last}: it was cut short, "
                         "and any members after that are missing")
    return members, None


def open_inside(container: str, inner: str, options) -> BinaryIO:
    """The bytes of member ``inner`` of a tar (the last of that name, as a run takes it)."""
    tree, _, compression = tar_members(container)
    if inner in tree.latest:
        target, _ = tree.file(inner)
        if target is not None:
            if compression is None:
                return NamedBytes(_read_range(container, target.offset_data, target.size, inner), inner)
            data = _stream_ranges(container, compression, [(target.offset_data, target.size)], inner)
            return NamedBytes(data[target.offset_data], inner)
    raise FileNotFoundError(f"{container} holds no member {inner}")
