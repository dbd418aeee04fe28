"""Inputs inside container files: WebDataset tar shards and Parquet files with an image column.

Each image in a container is one input, read by random access (never as a stream), so batches,
--shard, torchrun ranks and --resume work member by member exactly as they do for loose files:

    TarMember   one scan of the tar's headers (standard library tarfile, no decompression) gives
                each member's data offset and size; a worker reads just those bytes.
    ParquetRow  the file's metadata (pyarrow) gives its row groups; a worker reads the row group
                holding its row forward, a few rows at a time (its batch's rows are neighbours).

Keys (the stored ``paths``): the container's key as a loose file's would be, then ``/`` and
    a tar member's name:       ``00001.tar/000010005.jpg``
    a Parquet row's position:  ``train-0003.parquet/row=4711`` (0-based, over the whole file)
so a key's identity (sources.identity_of: root / key) is unique and stable like a file's.

WebDataset samples: members sharing a name up to the first dot of the base name are one sample
(``000010005.jpg``, ``000010005.txt``, ``000010005.json``); ``--keep txt,json`` stores the sample's
members of those extensions beside its image. ``--columns caption,url`` stores those Parquet
columns. Either is UTF-8 text (``""`` where a sample has none).

Compressed tars (.tar.gz, .tgz, .tar.bz2, .tar.xz, .tar.zst) cannot be read by offset: each is a
failure record asking for it to be decompressed first.
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass
from typing import BinaryIO

from vitcore.errors import UsageError, one_line
from vitcore.sources import Unlisted, escape_key, open_regular, path_identity

TAR_SUFFIXES = (".tar",)
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.zstd")
COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
# WebDataset's split of a member name: everything up to the first dot of the base name is the sample.
SAMPLE_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def container_kind(name: str) -> str | None:
    """"tar", "parquet", "compressed-tar" or None (an image or anything else), by the name's ending."""
    lower = name.lower()
    if lower.endswith(COMPRESSED_TAR_SUFFIXES):
        return "compressed-tar"
    if lower.endswith(TAR_SUFFIXES):
        return "tar"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


@dataclass(frozen=True)
class ContainerOptions:
    keep: tuple[str, ...] = ()  # WebDataset sidecar extensions stored as meta/<ext>
    columns: tuple[str, ...] = ()  # Parquet columns stored as meta/<column>
    image_column: str | None = None  # None: the first column holding image bytes

    @property
    def meta_names(self) -> tuple[str, ...]:
        return self.keep + self.columns


def parse_names(text, what: str) -> tuple[str, ...]:
    """``"txt,json"`` → ("txt", "json"), in the order given, each once. ``--keep`` extensions are
    matched whatever their case (as image extensions are), so they are kept in lower case."""
    if text is None:
        return ()
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else list(text)) if p.strip()]
    if what == "--keep":
        parts = [p.lstrip(".").lower() for p in parts]
    names = tuple(dict.fromkeys(parts))
    for name in names:
        if not name or name in (".", "..") or "/" in name:
            raise UsageError(f"{what} {name or '.'!r} is not a name that can be stored (meta/<name>): "
                             "give names such as " + ("txt,json" if what == "--keep" else "caption,url"))
    return names


def check_meta_names(options: ContainerOptions) -> None:
    clash = set(options.keep) & set(options.columns)
    if clash:
        raise UsageError(f"--keep and --columns both name {', '.join(sorted(clash))}: each becomes meta/<name>; "
                         "rename one (Parquet columns cannot be renamed here, so keep that one)")


class NamedBytes(io.BytesIO):
    """A container input's bytes; named in decoders' messages by its name, not by a memory address."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __repr__(self) -> str:
        return repr(self.name)


# -- tar shards ---------------------------------------------------------------------------
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

    def extras(self, names: tuple[str, ...]) -> dict[str, str]:
        found = {ext: (offset, size) for ext, offset, size in self.sidecars}
        out = {}
        for name in names:
            if name in found:
                offset, size = found[name]
                out[name] = _read_range(self.path, offset, size, name).decode("utf-8", "replace")
            else:
                out[name] = ""
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


def scan_tar(path: str, key: str, root_index: int, exts: tuple[str, ...], keep: tuple[str, ...]):
    """The image members of a tar shard, in the tar's order, and a record of what could not be
    scanned (a compressed or damaged tar, one cut short), or None.

    Members are taken as ``tar x`` would write them: a name met twice (or two names that are the
    same path, ``./a.jpg`` and ``a.jpg``) is one member, the later one."""
    where = escape_key(os.path.join(key, ""))
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
        if not match or match.group(2).rpartition(".")[2].lower() not in exts:
            continue
        kept = samples.get(match.group(1), {})
        sidecars = tuple((ext, *kept[ext]) for ext in keep if ext in kept)
        reason = None if info.isfile() else "a link or special entry inside the tar, not a file"
        sources.append(TarMember(path=path, member=info.name, key=escape_key(os.path.join(key, name)),
                                 root_index=root_index, offset=info.offset_data, size=info.size,
                                 sidecars=sidecars, problem=reason))
    record = Unlisted(where, root_index, problem) if problem else None
    return sources, record


class CompressedTar(OSError):
    """A tar compressed as a whole: its members have no offsets to read them by."""


@functools.lru_cache(maxsize=8)
def _scan(path: str, size: int, mtime: int) -> tuple[tuple[tarfile.TarInfo, ...], str | None]:
    with open_regular(path) as handle:
        head = handle.read(6)
        for magic, name in COMPRESSION_MAGIC.items():
            if head.startswith(magic):
                raise CompressedTar(f"compressed tar ({name}): members cannot be read by offset; "
                                    f"decompress it first (e.g. {name} -d)")
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


# -- Parquet files ------------------------------------------------------------------------
@dataclass(frozen=True)
class ParquetRow:
    """One row of a Parquet file's image column."""

    path: str
    row: int  # over the whole file
    key: str  # the file's key + "/row=<row>"
    root_index: int
    row_group: int
    index_in_group: int
    column: str  # the image column: a struct with "bytes" (Hugging Face datasets' Image) or binary
    columns: tuple[str, ...] = ()  # the columns kept as meta

    def open(self) -> BinaryIO:
        batch, at = _rows_at(self.path, self.row_group, (self.column, *self.columns), self.index_in_group)
        value = batch.column(self.column)[at].as_py()
        if isinstance(value, dict):  # datasets' Image: {"bytes": …, "path": …}
            data, named = value.get("bytes"), value.get("path")
            if data is None:
                hint = f" (it names a file, {named!r}, instead)" if named else ""
                raise ValueError(f"this row holds no image bytes{hint}")
        else:
            data = value
            if data is None:
                raise ValueError("this row's image column is null")
        return NamedBytes(data, f"row={self.row}")

    @property
    def identity(self) -> bytes:
        return path_identity(self.path, f"row={self.row}")

    def extras(self, names: tuple[str, ...]) -> dict[str, str]:
        batch, at = _rows_at(self.path, self.row_group, (self.column, *self.columns), self.index_in_group)
        out = {}
        for name in names:
            if name in self.columns:
                value = batch.column(name)[at].as_py()
                out[name] = "" if value is None else value if isinstance(value, str) else _as_text(value)
            else:
                out[name] = ""
        return out


def _as_text(value) -> str:
    import json

    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return json.dumps(value, default=str, ensure_ascii=False)


PARQUET_READ_ROWS = 16  # rows decoded at a time inside a row group


class _Cursor:
    """Where this process is reading a Parquet row group: rows are decoded forward, a few at a
    time (iter_batches), so a worker holds a few rows rather than its whole row group (a row group
    of 300 rows of 500 kB took 922 MB read whole, 385 MB read this way)."""

    def __init__(self, path: str, group: int, columns: tuple[str, ...]):
        import pyarrow.parquet as pq

        self.key, self.pid = (path, group, columns), os.getpid()
        self.handle = open_regular(path)
        reader = pq.ParquetFile(self.handle, pre_buffer=False, buffer_size=1 << 20)
        self.batches = reader.iter_batches(batch_size=PARQUET_READ_ROWS, row_groups=[group], columns=list(columns),
                                           use_threads=False)
        self.start, self.batch = 0, None  # the rows of ``batch`` are start, start + 1, … of the group
        self.error: str | None = None  # the row group could not be decoded past here

    def at(self, index: int):
        while self.batch is None or index >= self.start + len(self.batch):
            if self.error is not None:  # every later row of the group shares the reason
                raise ValueError(self.error)
            if self.batch is not None:
                self.start += len(self.batch)
            try:
                self.batch = next(self.batches, None)
            except Exception as err:
                self.batch = None
                self.error = f"its row group could not be decoded ({_one_line(err)})"
                raise ValueError(self.error) from None
            if self.batch is None:
                raise ValueError(f"row {index} of row group {self.key[1]} is past its end")
        return self.batch, index - self.start

    def close(self) -> None:
        if self.pid == os.getpid():  # a cursor inherited through a fork shares the parent's file offset
            self.handle.close()


_CURSOR: dict = {}  # this process's one cursor


def _rows_at(path: str, group: int, columns: tuple[str, ...], index: int):
    """(a record batch holding row ``index`` of row group ``group``, the row's place in it)."""
    cursor = _CURSOR.get("now")
    if cursor is None or cursor.key != (path, group, columns) or cursor.pid != os.getpid() or index < cursor.start:
        if cursor is not None:
            cursor.close()
        cursor = _CURSOR["now"] = _Cursor(path, group, columns)
    return cursor.at(index)


class NoImageColumn(UsageError):
    """A Parquet file without image bytes (img2dataset's metadata files beside its tars, say):
    refused when named, skipped (and counted) when found in a folder."""


def scan_parquet(path: str, key: str, root_index: int, options: ContainerOptions):
    """The rows of a Parquet file's image column, and a record when it cannot be read, or None.
    A column asked for that the file lacks is a usage error: every file must have it."""
    try:
        column, group_rows = parquet_layout(path, options)
    except ParquetUnreadable as err:
        return [], Unlisted(escape_key(os.path.join(key, "")), root_index, str(err))
    sources, row = [], 0
    for group, count in enumerate(group_rows):
        for i in range(count):
            sources.append(ParquetRow(path=path, row=row, key=escape_key(os.path.join(key, f"row={row}")),
                                      root_index=root_index, row_group=group, index_in_group=i, column=column,
                                      columns=options.columns))
            row += 1
    return sources, None


class ParquetUnreadable(OSError):
    """Not a Parquet file pyarrow can read (its reason in one line)."""


def parquet_layout(path: str, options: ContainerOptions) -> tuple[str, list[int]]:
    """(the image column, the rows of each row group) of a Parquet file, from its metadata alone;
    the columns asked for are checked against its schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open_regular(path) as handle:
            metadata = pq.ParquetFile(handle).metadata
            schema = metadata.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as err:
        raise ParquetUnreadable(f"{type(err).__name__}: not a readable Parquet file ({_one_line(err)})") from None
    column = options.image_column or _image_column(schema)
    if column is None:
        names = ", ".join(f"{f.name} ({f.type})" for f in schema)
        raise NoImageColumn(f"{path}: no column holds image bytes (columns: {names}); name one with --image-column")
    if column not in schema.names:
        raise NoImageColumn(f"{path} has no column {column!r} for --image-column (columns: {', '.join(schema.names)})")
    missing = [c for c in options.columns if c not in schema.names]
    if missing:
        raise UsageError(f"{path} has no column {', '.join(map(repr, missing))} for --columns "
                         f"(columns: {', '.join(schema.names)})")
    if not _holds_bytes(schema.field(column).type):
        raise UsageError(f"{path}: column {column!r} is {schema.field(column).type}, not image bytes "
                         "(binary, or a struct with a 'bytes' field as Hugging Face datasets write)")
    return column, [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]


def _holds_bytes(kind) -> bool:
    import pyarrow as pa

    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        return index >= 0 and _holds_bytes(kind.field(index).type)
    return False


def _image_column(schema) -> str | None:
    """The first column holding image bytes: datasets' Image struct first, then plain binary."""
    import pyarrow as pa

    structs = [f.name for f in schema if pa.types.is_struct(f.type) and _holds_bytes(f.type)]
    plain = [f.name for f in schema if _holds_bytes(f.type) and not pa.types.is_struct(f.type)]
    return (structs or plain or [None])[0]


def _one_line(err: BaseException) -> str:
    return one_line(err) or type(err).__name__


# -- brace ranges -------------------------------------------------------------------------
def expand_braces(given: str) -> list[str]:
    """``data/{00000..00099}.tar`` → the 100 names, as WebDataset expands shard lists (the braceexpand
    package); a name that exists as written, or has no braces, is taken as it is."""
    if "{" not in given or os.path.lexists(given):
        return [given]
    from braceexpand import braceexpand

    try:
        names = list(braceexpand(given))
    except Exception:  # unbalanced braces: a literal name after all
        return [given]
    return names or [given]


# -- reading an original back ----------------------------------------------------------------
def open_original(root: str, key: str, image_column: str | None = None) -> BinaryIO:
    """The bytes of the input a stored (root, key) names: a loose file, a tar member or a Parquet
    row (the key's first part that is a container file says which; ``image_column`` the file's
    --image-column). OSError when it is gone."""
    from vitcore.sources import source_path, unescape_key

    path = source_path(root, key)
    if os.path.isfile(path):
        return open_regular(os.fsdecode(path))
    parts = unescape_key(key).split(b"/")
    for cut in range(1, len(parts)):
        container = os.path.join(os.fsencode(root), b"/".join(parts[:cut]))
        kind = container_kind(os.fsdecode(container))
        if kind in ("tar", "parquet") and os.path.isfile(container):
            inner = os.fsdecode(b"/".join(parts[cut:]))
            return _open_inside(os.fsdecode(container), kind, inner, image_column)
    raise FileNotFoundError(f"{os.fsdecode(path)} is gone")


def _open_inside(container: str, kind: str, inner: str, image_column: str | None) -> BinaryIO:
    if kind == "tar":
        members, _ = tar_members(container)
        for info in reversed(members):  # the last of a name, as the run took it
            if member_key(info.name) == inner and info.isfile():
                return NamedBytes(_read_range(container, info.offset_data, info.size, inner), inner)
        raise FileNotFoundError(f"{container} holds no member {inner}")
    match = re.fullmatch(r"row=(\d+)", inner)
    if match is None:
        raise FileNotFoundError(f"{inner!r} names no row of {container}")
    column, group_rows = parquet_layout(container, ContainerOptions(image_column=image_column))
    row = wanted = int(match.group(1))
    for group, count in enumerate(group_rows):  # the row group holding it: no other row is looked at
        if row < count:
            return ParquetRow(path=container, row=wanted, key=inner, root_index=0, row_group=group,
                              index_in_group=row, column=column).open()
        row -= count
    raise FileNotFoundError(f"{container} has no row {wanted}")
