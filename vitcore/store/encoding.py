"""How the large arrays are encoded on disk: their element type (float16, float32, bfloat16) and
their compression (none, gzip, lz4, zstd). Torch-free.

bfloat16 is stored as an HDF5 floating-point type of its own: 16 bits, sign at bit 15, an 8-bit
exponent at bits 7–14 (bias 127) and a 7-bit mantissa (the layout of HDF5 2.0's predefined
bfloat16). Any HDF5 reader converts it exactly: plain h5py reads it as float32 (HDF5's own
conversion, about 30 MB/s here). vit-extract reads and writes its bits as they are (no
conversion: > 1 GB/s) and hands them out as ``ml_dtypes.bfloat16`` arrays, numpy's bfloat16.

gzip is HDF5's own filter; lz4 and zstd come from hdf5plugin (an extra: ``vit-extract[compression]``),
which a reader imports before h5py reads such a file. Each is applied after HDF5's byte shuffle,
which groups the high bytes of the floats (sign and exponent) together: they compress, the low
mantissa bytes mostly do not.
"""

from __future__ import annotations

import importlib

import h5py
import numpy as np
from h5py import h5s, h5t

from vitcore.errors import UsageError, VitExtractError

COMPRESSION_EXTRA = "pip install 'vit-extract[compression]'"
PLUGIN_FILTERS = ("lz4", "zstd")  # from hdf5plugin; gzip is built into HDF5
GZIP_LEVEL = 4  # gzip 9 is 3–4× slower to write for about 1 % smaller tokens


def bfloat16_type() -> h5t.TypeFloatID:
    """The HDF5 type bfloat16 tokens are stored as (see the module's docstring)."""
    t = h5t.IEEE_F16LE.copy()
    t.set_fields(15, 7, 8, 0, 7)  # sign position, exponent position and size, mantissa position and size
    t.set_ebias(127)
    return t


def numpy_dtype(name: str) -> np.dtype:
    """A stored dtype's numpy dtype in memory: float16, float32, or ml_dtypes' bfloat16."""
    if name == "bfloat16":
        import ml_dtypes  # numpy's bfloat16 (JAX's and TensorFlow's)

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def is_bfloat16_array(values) -> bool:
    """Whether ``values`` is a numpy array of ml_dtypes' bfloat16 (told by name: importing ml_dtypes
    takes half a second, which a run that stores no bfloat16 should not pay)."""
    dtype = getattr(values, "dtype", None)
    return isinstance(dtype, np.dtype) and dtype.name == "bfloat16"


def file_type(name: str):
    """What create_dataset takes as ``dtype`` for a stored dtype: a numpy dtype, or the bfloat16 type."""
    return bfloat16_type() if name == "bfloat16" else np.dtype(name)


def is_bfloat16(dataset: h5py.Dataset) -> bool:
    t = dataset.id.get_type()
    return isinstance(t, h5t.TypeFloatID) and t.get_size() == 2 and t.get_fields()[2] == 8  # 8 exponent bits


def stored_dtype(dataset: h5py.Dataset) -> str:
    """A dataset's element type by name as stored ("bfloat16" where h5py would say float32)."""
    return "bfloat16" if is_bfloat16(dataset) else str(dataset.dtype)


def same_type(dataset: h5py.Dataset):
    """What create_dataset / VirtualLayout take to make another dataset of ``dataset``'s type."""
    return bfloat16_type() if is_bfloat16(dataset) else dataset.dtype


def creation_options(compression: str) -> dict:
    """create_dataset keywords for a large array under ``compression`` (none, gzip, lz4, zstd)."""
    if compression == "none":
        return {}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": GZIP_LEVEL, "shuffle": True}
    plugin = load_plugins(compression)
    return {"shuffle": True, **(plugin.LZ4() if compression == "lz4" else plugin.Zstd())}


def load_plugins(compression: str):
    """hdf5plugin, imported (which registers its filters with HDF5), or a one-line error."""
    try:
        import hdf5plugin
    except ImportError:
        raise UsageError(f"--compression {compression} needs hdf5plugin: {COMPRESSION_EXTRA}") from None
    return hdf5plugin


def readable(compression: str, path: str) -> None:
    """Make a file compressed with ``compression`` readable here (its filter registered), or say how."""
    if compression in PLUGIN_FILTERS:
        try:
            importlib.import_module("hdf5plugin")  # importing it registers the lz4 and zstd filters with HDF5
        except ImportError:
            raise VitExtractError(f"{path} is compressed with {compression}; reading it needs hdf5plugin: "
                                  f"{COMPRESSION_EXTRA}") from None


# -- bfloat16 bits, as they are -------------------------------------------------------------
def _rows_space(dataset: h5py.Dataset, start: int, count: int):
    """(file selection of rows [start, start + count), memory space, shape)."""
    shape = (count, *dataset.shape[1:])
    fspace = dataset.id.get_space()
    fspace.select_hyperslab((start,) + (0,) * (len(shape) - 1), shape)
    return fspace, h5s.create_simple(shape), shape


def read_rows(dataset: h5py.Dataset, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a bfloat16 dataset as an ml_dtypes.bfloat16 array (no conversion)."""
    stop = min(stop, dataset.shape[0])
    count = max(stop - start, 0)
    out = np.empty((count, *dataset.shape[1:]), np.uint16)
    if count:
        fspace, mspace, _ = _rows_space(dataset, start, count)
        dataset.id.read(mspace, fspace, out, mtype=dataset.id.get_type())
    return out.view(numpy_dtype("bfloat16"))


def write_rows(dataset: h5py.Dataset, start: int, values: np.ndarray) -> None:
    """Write bfloat16 ``values`` (ml_dtypes) as rows from ``start``; the dataset is already long enough."""
    bits = np.ascontiguousarray(values).view(np.uint16)
    fspace, mspace, _ = _rows_space(dataset, start, len(bits))
    dataset.id.write(mspace, fspace, bits, mtype=dataset.id.get_type())


def write_at(dataset: h5py.Dataset, start: int, values) -> None:
    """Write ``values`` as rows from ``start`` (the dataset is already long enough): bfloat16 bits as
    they are (h5py cannot convert numpy's bfloat16), any other array through h5py."""
    if is_bfloat16_array(values):
        write_rows(dataset, start, values)
    else:
        dataset[start : start + len(values)] = values


class StoredArray:
    """``dataset[...]`` for the reader: bfloat16 bits as they are, other types through h5py."""

    def __init__(self, dataset: h5py.Dataset):
        self.dataset = dataset
        self.bfloat16 = is_bfloat16(dataset)

    def __getitem__(self, item):
        if not self.bfloat16:
            return self.dataset[item]
        if isinstance(item, slice):
            start, stop, step = item.indices(self.dataset.shape[0])
            if step != 1:
                raise IndexError("bfloat16 rows are read in steps of 1")
            return read_rows(self.dataset, start, stop)
        i = int(item)
        i = i + self.dataset.shape[0] if i < 0 else i
        return read_rows(self.dataset, i, i + 1)[0]

    def __len__(self) -> int:
        return self.dataset.shape[0]
