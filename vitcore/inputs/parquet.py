"""Parquet files with an image column: each row is one input. The file's metadata (pyarrow) gives
its row groups; a worker reads the row group holding its row forward, a few rows at a time (its
batch's rows are neighbours), so batches, --shard, torchrun ranks and --resume work row by row.

Keys: the file's key as a loose file's would be, then ``/row=N`` (0-based, over the whole file):
``train-0003.parquet/row=4711``. A column holding a list of images per row (the datasets layout
``Sequence(Image())``: ``list<struct<bytes, path>>``, or ``list<binary>``) gives one input per image,
``row=N/image=K`` (K 0-based in the row's list). ``--columns caption,url`` stores those columns as
UTF-8 text (each image of a row gets the row's text).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from typing import BinaryIO

from vitcore.errors import UsageError, one_line
from vitcore.inputs.base import JsonText, NamedBytes, NotTaken, PassedOver, Unlisted, escape_key, open_input, path_identity
from vitcore.options import ContainerOptions

SUFFIXES = (".parquet",)


def claims(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


@dataclass(frozen=True)
class ParquetRow:
    """One row of a Parquet file's image column."""

    path: str
    row: int  # over the whole file
    key: str  # the file's key + "/row=<row>"
    root_index: int
    row_group: int
    index_in_group: int
    column: str  # the image column: a struct with "bytes" (Hugging Face datasets' Image) or binary, or a list of them
    columns: tuple[str, ...] = ()  # the columns kept as meta
    image: int | None = None  # a list column: this image's place in the row's list

    @property
    def inner(self) -> str:
        """Its name inside the file: ``row=N``, or ``row=N/image=K``."""
        return f"row={self.row}" if self.image is None else f"row={self.row}/image={self.image}"

    def open(self) -> BinaryIO:
        batch, at = _rows_at(self.path, self.row_group, (self.column, *self.columns), self.index_in_group)
        value = batch.column(self.column)[at].as_py()
        if isinstance(value, list) and self.image is None:
            raise ValueError("this row holds no image: its image list is empty")
        if self.image is not None:
            value = value[self.image] if value is not None and self.image < len(value) else None
        where = "this row" if self.image is None else f"image {self.image} of this row"
        if isinstance(value, dict):  # datasets' Image: {"bytes": …, "path": …}
            data, named = value.get("bytes"), value.get("path")
            if data is None:
                hint = f" (it names a file, {named!r}, instead)" if named else ""
                raise ValueError(f"{where} holds no image bytes{hint}")
        else:
            data = value
            if data is None:
                raise ValueError(f"{where} is null in the image column")
        return NamedBytes(data, self.inner)

    @property
    def identity(self) -> bytes:
        return path_identity(self.path, self.inner)

    def extras(self, names: tuple[str, ...]) -> dict[str, str | None]:
        batch, at = _rows_at(self.path, self.row_group, (self.column, *self.columns), self.index_in_group)
        out = {}
        for name in names:
            if name in self.columns:
                out[name] = column_text(batch.column(name)[at])
            else:
                out[name] = None
        return out


def column_text(scalar) -> str | None:
    """A --columns value (a pyarrow scalar) as stored: null stays None (the absence mask says so),
    text as it is, binary as UTF-8 (invalid bytes replaced), anything else as JSON, by its type:
    numbers (float32 by its own shortest digits), lists, structs, maps as objects (as [key, value]
    pairs where a key repeats), timestamps, dates and times as ISO 8601 strings, durations as
    seconds, decimals as exact strings; NaN and infinities as null, counted. A value Python cannot
    hold (a nanosecond timestamp, a date past year 9999) is pyarrow's own text of it: a value never
    costs its image its row."""
    import pyarrow as pa  # pyarrow: only where a Parquet file is read

    if not scalar.is_valid:
        return None
    kind = scalar.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return scalar.as_py()
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        return scalar.as_py().decode("utf-8", "replace")
    nonfinite = [0]
    try:
        value = _json_value(scalar, nonfinite)
    except Exception:  # a type this does not know: pyarrow's own text of it
        value = str(scalar)
    return JsonText(json.dumps(value, ensure_ascii=False, allow_nan=False), nonfinite[0])


def _json_value(scalar, nonfinite: list[int]):
    """A pyarrow scalar → what JSON holds, by its type."""
    import pyarrow as pa

    if not scalar.is_valid:
        return None
    kind = scalar.type
    if pa.types.is_dictionary(kind):
        return _json_value(scalar.value, nonfinite)
    if pa.types.is_floating(kind):
        value = scalar.as_py()
        if not math.isfinite(value):
            nonfinite[0] += 1
            return None
        if kind.bit_width < 64:  # a float32 by its own shortest digits: 0.1, not 0.10000000149011612
            import numpy as np

            return float(str(np.float32(value)))
        return value
    if pa.types.is_boolean(kind) or pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return scalar.as_py()
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        return scalar.as_py().decode("utf-8", "replace")
    if pa.types.is_decimal(kind):
        return str(scalar.as_py())  # exact, as text (a float would round it)
    if pa.types.is_duration(kind):  # seconds
        return scalar.value / {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}[kind.unit]
    if pa.types.is_temporal(kind):
        try:
            if pa.types.is_timestamp(kind) and kind.unit == "ns":  # past a datetime's microseconds: pyarrow's
                raise ValueError  # own text (as_py gives a pandas Timestamp where pandas is installed)
            value = scalar.as_py()
        except (ValueError, OverflowError):  # nanoseconds, or a year Python's datetime cannot hold
            text = scalar.cast(pa.string()).as_py()
            return text.replace(" ", "T", 1) if pa.types.is_timestamp(kind) else text
        return value.isoformat()
    if pa.types.is_map(kind):
        pairs = [(_json_value(item["key"], nonfinite), _json_value(item["value"], nonfinite)) for item in scalar.values or []]
        keys = [json.dumps(k) if not isinstance(k, str) else k for k, _ in pairs]
        if len(set(keys)) < len(keys):  # a key twice: a JSON object would lose one
            return [[k, v] for k, v in pairs]
        return {key: v for key, (_, v) in zip(keys, pairs)}
    if pa.types.is_struct(kind):
        return {field.name: _json_value(scalar[i], nonfinite) for i, field in enumerate(kind)}
    if hasattr(scalar, "values"):  # list, large list, fixed-size list, list view
        return [_json_value(item, nonfinite) for item in (scalar.values or [])]
    return str(scalar)


# Rows decoded at a time inside a row group. One: pyarrow's reader holds a data page and the values
# decoded from it, and a page often spans the whole row group (pyarrow's writer checks a page's size
# only every 1,024 values, so images of 500 kB fill one page per row group); decoding one row at a
# time keeps that to the page plus one row. A 50 MB row group in one page: 146 MB of peak growth
# at 16 rows, 104 MB at one (bench/parquet_memory.py); one row at a time is also faster.
PARQUET_READ_ROWS = 1


class _Cursor:
    """Where this process is reading a Parquet row group: rows are decoded forward, one at a time
    (iter_batches), so a worker holds a page and a row rather than its whole row group decoded."""

    def __init__(self, path: str, group: int, columns: tuple[str, ...]):
        import pyarrow.parquet as pq  # pyarrow: only where a Parquet file is read

        self.key, self.pid = (path, group, columns), os.getpid()
        self.handle = open_input(path)
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


def close_readers() -> None:
    """Close this process's row-group cursor (a run's end)."""
    cursor = _CURSOR.pop("now", None)
    if cursor is not None:
        cursor.close()


class NoImageColumn(PassedOver):
    """A Parquet file without image bytes (img2dataset's metadata files beside its tars, say):
    refused when named, skipped (and counted) when found in a folder."""


def holds_nothing(path: str, exts: tuple[str, ...]) -> str:
    return f"{path} holds no image (it has no rows)"


def passed_over_note(keys: list[str]) -> str:
    """The summary's line for the Parquet files in folders that hold no image column."""
    shown = ", ".join(keys[:3]) + (" …" if len(keys) > 3 else "")
    files = "1 Parquet file in the folders has" if len(keys) == 1 else f"{len(keys)} Parquet files in the folders have"
    passed = "was" if len(keys) == 1 else "were"
    return (f"{files} no column of image bytes and {passed} passed over "
            f"({shown}; img2dataset writes such metadata files beside its tars)")


def scan(path: str, key: str, root_index: int, exts: tuple[str, ...], options: ContainerOptions,
         not_taken: NotTaken):
    """The rows of a Parquet file's image column, and a record when it cannot be read, or None.
    A column asked for that the file lacks is a usage error: every file must have it."""
    try:
        column, group_rows = parquet_layout(path, options)
    except ParquetUnreadable as err:
        return [], Unlisted(escape_key(os.path.join(key, "")), root_index, str(err))
    try:
        images = _images_per_row(path, column, group_rows)  # None: one image per row
    except ParquetUnreadable as err:
        return [], Unlisted(escape_key(os.path.join(key, "")), root_index, str(err))
    sources, row = [], 0
    for group, count in enumerate(group_rows):
        for i in range(count):
            # A row whose list is empty stays one input, row=N: its failure record says so.
            for k in range(images[row]) if images is not None and images[row] else (None,):
                item = ParquetRow(path=path, row=row, key="", root_index=root_index, row_group=group,
                                  index_in_group=i, column=column, columns=options.columns, image=k)
                sources.append(dataclasses.replace(item, key=escape_key(os.path.join(key, item.inner))))
            row += 1
    return sources, None


def _images_per_row(path: str, column: str, group_rows: list[int]) -> list[int] | None:
    """How many images each row's list holds, for a list column (None for one image per row). Read
    from the smallest part of the column: the images' paths where the list holds datasets' Image
    structs (a few bytes a row), else the list itself, one row group at a time."""
    import pyarrow as pa  # pyarrow: only where a Parquet file is read
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        with open_input(path) as handle:
            reader = pq.ParquetFile(handle)
            kind = reader.schema_arrow.field(column).type
            if not _is_list(kind):
                return None
            paths = [reader.schema.column(i).path for i in range(len(reader.schema))]  # leaves: images.list.element.path
            leaf = [name for name in paths if name.startswith(f"{column}.") and name.endswith(".path")]
            counts = []
            for group in range(len(group_rows)):
                lists = reader.read_row_group(group, columns=leaf[:1] or [column]).column(0)
                counts += pc.fill_null(pc.list_value_length(lists), 0).to_pylist()
    except (OSError, pa.ArrowException) as err:
        raise ParquetUnreadable(f"{type(err).__name__}: its image lists could not be read ({_one_line(err)})") from None
    return counts


class ParquetUnreadable(OSError):
    """Not a Parquet file pyarrow can read (its reason in one line)."""


def parquet_layout(path: str, options: ContainerOptions) -> tuple[str, list[int]]:
    """(the image column, the rows of each row group) of a Parquet file, from its metadata alone;
    the columns asked for are checked against its schema."""
    import pyarrow as pa  # pyarrow: only where a Parquet file is read
    import pyarrow.parquet as pq

    try:
        with open_input(path) as handle:
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
                         "(binary, a struct with a 'bytes' field as Hugging Face datasets write, or a list of those)")
    return column, [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]


def _holds_bytes(kind, lists: bool = True) -> bool:
    """Binary, a struct with binary "bytes" (datasets' Image), or (``lists``) a list of either."""
    import pyarrow as pa  # pyarrow: only where a Parquet file is read

    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        return index >= 0 and _holds_bytes(kind.field(index).type, lists=False)
    return lists and _is_list(kind) and _holds_bytes(kind.value_type, lists=False)


def _is_list(kind) -> bool:
    import pyarrow as pa  # pyarrow: only where a Parquet file is read

    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def _image_column(schema) -> str | None:
    """The first column holding image bytes: datasets' Image struct first, then plain binary, then
    a list of images per row."""
    import pyarrow as pa  # pyarrow: only where a Parquet file is read

    held = [f for f in schema if _holds_bytes(f.type)]
    structs = [f.name for f in held if pa.types.is_struct(f.type)]
    plain = [f.name for f in held if not pa.types.is_struct(f.type) and not _is_list(f.type)]
    lists = [f.name for f in held if _is_list(f.type)]
    return (structs or plain or lists or [None])[0]


def _one_line(err: BaseException) -> str:
    return one_line(err) or type(err).__name__


def open_inside(container: str, inner: str, options: ContainerOptions) -> BinaryIO:
    """The bytes of ``inner`` (``row=N``, or ``row=N/image=K`` in a list column) of a Parquet file;
    only its row group is read."""
    match = re.fullmatch(r"row=(\d+)(?:/image=(\d+))?", inner)
    if match is None:
        raise FileNotFoundError(f"{inner!r} names no row of {container}")
    column, group_rows = parquet_layout(container, options)
    row = wanted = int(match.group(1))
    image = int(match.group(2)) if match.group(2) is not None else None
    for group, count in enumerate(group_rows):  # the row group holding it: no other row is looked at
        if row < count:
            return ParquetRow(path=container, row=wanted, key=inner, root_index=0, row_group=group,
                              index_in_group=row, column=column, image=image).open()
        row -= count
    raise FileNotFoundError(f"{container} has no row {wanted}")
