"""The HDF5 schema, in one table: every attribute and dataset of an output file, listed once.

Layout (schema_version 1; the README documents it):

    tokens        (N, T, D) or pooled (N, D)   out dtype (float16, float32, bfloat16: encoding.py);
                                               chunk = one image (pooled: 128 rows); --compression
                  ragged (Σ T_i, D) + token_offset (N,) int64 + num_tokens (N,) int32
    mean          (N, D)                       each image's mean token (only when tokens are unpooled)
    layers/<K>, features/<name>                extra per-image arrays, laid out like tokens
                                               (a ragged one has <name>_token_offset / <name>_num_tokens)
    grid_thw      (N, 3) int32                 the patch grid (t, h, w), for families that store it
    paths         (N,)  UTF-8                  key of row i, relative to roots[root_index[i]]
    meta/<name>   (N,)  UTF-8                  text kept beside each image (--keep, --columns; "" if none)
    root_index    (N,)  int32
    image_size    (N, 2) int32                 original upright (width, height)
    failed/paths, failed/errors  (M,) UTF-8   key (as for paths) and a one-line reason
    failed/root_index            (M,) int32

The attributes are in ATTRIBUTES below, with whether a resume (and a merge) compares them; the
writer, the resume check, the reader, `info` and merge are all driven by that table.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import h5py
import numpy as np

from vitcore.imaging import HIGH_BIT_DEPTH
from vitcore.store.encoding import creation_options, file_type, numpy_dtype

SCHEMA_VERSION = 1
STRING = h5py.string_dtype("utf-8")
POOLED_CHUNK_ROWS = 128
RAGGED_CHUNK_ROWS = 256  # tokens per chunk of a flat (Σ tokens, D) dataset
PER_ROW_CHUNK = 4096  # rows per chunk of the small 1-D / (N, 2) datasets
ROW_INFO = ("paths", "root_index", "image_size")  # per image, beside the arrays
FAILED_DATASETS = ("failed/paths", "failed/errors", "failed/root_index")


@dataclass(frozen=True)
class ArraySpec:
    """One per-image array a run stores: ``tokens`` first, then extras (``layers/K``, ``features/<name>``).

    ``shape`` is per image as stored: (T, W), or pooled (W,); for ragged arrays (a count that
    varies per image, stored flat with offsets and counts) it is (W,) per token.
    """

    name: str
    shape: tuple[int, ...]
    ragged: bool = False

    @property
    def width(self) -> int:
        return self.shape[-1]


@dataclass(frozen=True)
class StoreSettings:
    """Everything the file records about how its rows were made."""

    encoder: str  # JSON, with "family"
    weights: str  # WeightsInfo JSON
    preprocessing: str  # JSON
    pooling: str
    projector: str  # JSON: {"dim": P} or null
    compute_dtype: str
    device: str
    out_dtype: str  # "float16" | "float32" | "bfloat16"
    arrays: tuple[ArraySpec, ...]  # as stored (after pooling): "tokens" first, then layers/K, features/<name>
    mean: bool = True  # store each image's mean token (tokens unpooled)
    grid_thw: bool = False  # store each image's patch grid (t, h, w)
    version: str = ""
    shard: str = "null"  # ShardRecord JSON for shard files (--shard, torchrun), else null
    meta: tuple[str, ...] = ()  # text datasets meta/<name>, one string per row (--keep, --columns)
    image_column: str = "null"  # JSON: the Parquet column the images were read from (--image-column), or null: auto
    image_columns_used: str = "[]"  # JSON: the columns the Parquet inputs' images were read from, as chosen
    compression: str = "none"  # of the large arrays (tokens, mean, layers, features): none | gzip | lz4 | zstd

    @property
    def token_shape(self) -> tuple[int, ...]:
        return self.arrays[0].shape

    @property
    def ragged(self) -> bool:
        return self.arrays[0].ragged

    @property
    def layers(self) -> list[int]:
        return [int(s.name.partition("/")[2]) for s in self.arrays if s.name.startswith("layers/")]

    @property
    def features(self) -> list[list]:
        """[name, shape, ragged] of each features/<name> array (the ``features`` attribute)."""
        return [[s.name.partition("/")[2], list(s.shape), s.ragged] for s in self.arrays if s.name.startswith("features/")]


@dataclass(frozen=True)
class Attribute:
    """One root attribute of an output file."""

    name: str
    kind: str  # "setting": how the rows were made; "state": the writer's bookkeeping; "merged": a merge's record
    value: Callable[[StoreSettings], Any] | None = None  # a setting's value for a new file
    json: bool = False  # JSON text (the reader decodes it)
    compare: str | None = None  # resume and merge refuse files where it differs; the words that name it
    key: Callable[[Any], Any] = lambda text: text  # what is compared
    equal: Callable[[Any, Any], bool] | None = None  # compares two values itself (instead of their keys)
    default: Any = None  # for files made before the attribute existed
    merge: str = "own"  # first: the first shard's, joined: devices of the shards with rows, own: merge's
    required: bool = False  # a file without it is not a complete vit-extract output (resume refuses it)

    def differs(self, then, now) -> bool:
        """Whether two stored values of this setting differ (resume and merge refuse them)."""
        if self.equal is not None:
            return not self.equal(then, now)
        return self.key(then) != self.key(now)


def _same_encoder(then: str, now: str) -> bool:
    """Encoder records are equal; a record that names no family (files made before records named
    their family) matches one that does when everything else is equal."""
    before, after = json.loads(then), json.loads(now)
    if "family" not in before or "family" not in after:
        before.pop("family", None)
        after.pop("family", None)
    return before == after


OLD_HIGH_BIT_DEPTH = "I;16 /257; I and F by value range (see README)"  # what 0.1.0 files record


def _preprocessing_key(text: str) -> str:
    """Files made by 0.1.0 describe their high-bit-depth rule in older words; for every 8-bit
    picture (and I;16) the rule is the same, so those files still resume. Qwen-VL files made before
    the processor backend was a choice followed the Pillow backend."""
    record = json.loads(text)
    if record.get("high_bit_depth") == OLD_HIGH_BIT_DEPTH:
        record["high_bit_depth"] = HIGH_BIT_DEPTH
    if "merge_size" in record:  # a Qwen-VL record
        record["backend"] = processor_backend(record)
    return json.dumps(record, sort_keys=True)


def processor_backend(preprocessing: dict) -> str:
    """The image-processor backend a Qwen-VL file's rows follow: recorded, or for files made before
    the choice existed (0.3.0 and earlier), the Pillow backend, their only one."""
    return preprocessing.get("backend", "pil")


def weights_identity(text_or_record) -> str:
    """What must match for --resume: the seed, or the content of the weights (not their path; a file
    init-weights wrote, source "untrained file", is a file like any other here)."""
    record = json.loads(text_or_record) if isinstance(text_or_record, str) else text_or_record
    if record.get("source") == "untrained":
        return f"untrained seed {record.get('seed')}"
    return f"sha256 {record.get('sha256')}"


def describe_weights(text_or_record) -> str:
    """The ``weights`` record in words, for the summary and `info`."""
    record = json.loads(text_or_record) if isinstance(text_or_record, str) else text_or_record
    source, seed, path = record.get("source"), record.get("seed"), record.get("path")
    if source == "untrained":
        return f"UNTRAINED (random init, seed {seed})"
    if source == "untrained file":
        return f"UNTRAINED (random init, seed {seed}, written by init-weights to {path})"
    return f"{path} (sha256 {str(record.get('sha256'))[:12]}…)"


ATTRIBUTES = (
    Attribute("schema_version", "state", required=True),
    Attribute("vit_extract_version", "setting", lambda s: s.version, merge="first"),
    Attribute("created", "state"),
    Attribute("run_id", "state"),  # a merged file checks that its shards are still these files
    Attribute("encoder", "setting", lambda s: s.encoder, json=True, compare="encoder", equal=_same_encoder, merge="first",
              required=True),
    Attribute("weights", "setting", lambda s: s.weights, json=True, compare="weights", key=weights_identity,
              merge="first", required=True),
    Attribute("preprocessing", "setting", lambda s: s.preprocessing, json=True, compare="preprocessing",
              key=_preprocessing_key, merge="first", required=True),
    Attribute("pooling", "setting", lambda s: s.pooling, compare="pooling", merge="first", required=True),
    Attribute("projector", "setting", lambda s: s.projector, json=True, compare="projector", merge="first",
              required=True),
    Attribute("compute_dtype", "setting", lambda s: s.compute_dtype, compare="compute dtype", merge="first",
              required=True),
    Attribute("device", "setting", lambda s: s.device, merge="joined"),  # every device that made rows
    Attribute("out_dtype", "setting", lambda s: s.out_dtype, compare="--out-dtype", merge="first", required=True),
    # Compared so that one file is encoded one way throughout (a merge keeps it; readers need one filter).
    Attribute("compression", "setting", lambda s: s.compression, compare="--compression", default="none",
              merge="first"),
    Attribute("layers", "setting", lambda s: json.dumps(s.layers), json=True, compare="--layer list", merge="first",
              required=True),
    Attribute("features", "setting", lambda s: json.dumps(s.features), json=True, compare="--features list",
              default="[]", merge="first"),
    Attribute("ragged", "setting", lambda s: s.ragged, default=False, merge="first"),
    Attribute("shard", "setting", lambda s: s.shard, json=True, compare="input list or shard range", default="null"),
    Attribute("meta", "setting", lambda s: json.dumps(list(s.meta)), json=True, compare="--keep / --columns list",
              key=lambda text: sorted(json.loads(text)), default="[]", merge="first"),
    Attribute("image_column", "setting", lambda s: s.image_column, json=True, compare="--image-column",
              default="null", merge="first"),
    # What --image-column (or its automatic choice) read: recorded, not compared (the choice is the file's).
    Attribute("image_columns_used", "setting", lambda s: s.image_columns_used, json=True, default="[]", merge="first"),
    Attribute("roots", "state", json=True, required=True),
    Attribute("committed", "state", required=True),
    Attribute("failed_committed", "state", required=True),
    Attribute("complete", "state"),
    Attribute("merged", "merged"),  # "virtual" or "copy"
    Attribute("shards", "merged", json=True),
    Attribute("inputs_sha256", "merged"),
)
BY_NAME = {a.name: a for a in ATTRIBUTES}
REQUIRED = tuple(a.name for a in ATTRIBUTES if a.required)


def compared() -> list[Attribute]:
    """The settings a resume and a merge require to be equal."""
    return [a for a in ATTRIBUTES if a.compare]


def stored_value(attrs, attribute: Attribute):
    """An attribute's raw value in a file (its default when the file predates it)."""
    value = attrs.get(attribute.name, attribute.default)
    return value.item() if isinstance(value, np.generic) else value


def decoded(attrs) -> dict:
    """Every root attribute, JSON values decoded."""
    out = {}
    for name, value in attrs.items():
        if isinstance(value, np.generic):
            value = value.item()
        if name in BY_NAME and BY_NAME[name].json:
            value = json.loads(value)
        out[name] = value
    return out


# -- datasets ---------------------------------------------------------------------------
def ragged_index_names(name: str) -> tuple[str, str]:
    """The offset and count datasets of a flat dataset: token_offset / num_tokens for tokens."""
    if name == "tokens":
        return "token_offset", "num_tokens"
    return f"{name}_token_offset", f"{name}_num_tokens"


def chunks(row_shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1, *row_shape) if len(row_shape) == 2 else (POOLED_CHUNK_ROWS, *row_shape)


def array_names(attrs, datasets) -> list[str]:
    """The large per-image arrays of a file: tokens, mean, layers/K, features/<name>."""
    names = [n for n in ("tokens", "mean") if n in datasets]
    names += [f"layers/{k}" for k in json.loads(stored_value(attrs, BY_NAME["layers"]) or "[]")]
    names += [f"features/{n}" for n, _, _ in json.loads(stored_value(attrs, BY_NAME["features"]))]
    return names


def lay_out(h5: h5py.File, settings: StoreSettings, roots: list[str], stamp: dict) -> None:
    """The attributes and the empty, extendable datasets of a new output."""
    attrs = h5.attrs
    for attribute in ATTRIBUTES:
        if attribute.kind == "setting":
            attrs[attribute.name] = attribute.value(settings)
    state = dict(schema_version=SCHEMA_VERSION, roots=json.dumps(roots), committed=0, failed_committed=0,
                 complete=False, **stamp)
    for name, value in state.items():
        attrs[name] = value
    dtype = file_type(settings.out_dtype)
    encoded = creation_options(settings.compression)
    for spec in settings.arrays:
        if spec.ragged:
            create_ragged(h5, spec.name, spec.width, dtype, encoded)
        else:
            h5.create_dataset(spec.name, (0, *spec.shape), dtype, maxshape=(None, *spec.shape),
                              chunks=chunks(spec.shape), **encoded)
    if settings.mean:
        width = (settings.arrays[0].width,)
        h5.create_dataset("mean", (0, *width), dtype, maxshape=(None, *width), chunks=chunks(width), **encoded)
    if settings.grid_thw:
        h5.create_dataset("grid_thw", (0, 3), np.int32, maxshape=(None, 3), chunks=(PER_ROW_CHUNK, 3))
    h5.create_dataset("paths", (0,), STRING, maxshape=(None,), chunks=(PER_ROW_CHUNK,))
    for name in settings.meta:
        h5.create_dataset(f"meta/{name}", (0,), STRING, maxshape=(None,), chunks=(PER_ROW_CHUNK,))
        h5.create_dataset(absent_mask(name), (0,), np.uint8, maxshape=(None,), chunks=(PER_ROW_CHUNK,))
    h5.create_dataset("root_index", (0,), np.int32, maxshape=(None,), chunks=(PER_ROW_CHUNK,))
    h5.create_dataset("image_size", (0, 2), np.int32, maxshape=(None, 2), chunks=(PER_ROW_CHUNK, 2))
    h5.create_dataset("failed/paths", (0,), STRING, maxshape=(None,), chunks=(PER_ROW_CHUNK,))
    h5.create_dataset("failed/errors", (0,), STRING, maxshape=(None,), chunks=(PER_ROW_CHUNK,))
    h5.create_dataset("failed/root_index", (0,), np.int32, maxshape=(None,), chunks=(PER_ROW_CHUNK,))


def create_ragged(h5: h5py.File, name: str, width: int, dtype, encoded: dict | None = None) -> None:
    h5.create_dataset(name, (0, width), dtype, maxshape=(None, width), chunks=(RAGGED_CHUNK_ROWS, width),
                      **(encoded or {}))
    offsets, counts = ragged_index_names(name)
    h5.create_dataset(offsets, (0,), np.int64, maxshape=(None,), chunks=(PER_ROW_CHUNK,))
    h5.create_dataset(counts, (0,), np.int32, maxshape=(None,), chunks=(PER_ROW_CHUNK,))


def row_datasets(settings: StoreSettings) -> list[str]:
    """Datasets with one row per image (truncated to ``committed`` on resume)."""
    names = list(ROW_INFO) + meta_datasets(settings.meta)
    names += [s.name for s in settings.arrays if not s.ragged]
    if settings.mean:
        names.append("mean")
    if settings.grid_thw:
        names.append("grid_thw")
    for spec in settings.arrays:
        if spec.ragged:
            names += list(ragged_index_names(spec.name))
    return names


def meta_datasets(names) -> list[str]:
    """The text datasets of the names a file keeps (its ``meta`` attribute), and beside each its
    absence mask (uint8, 1 where the row had no value: no such sidecar, a null Parquet value; the
    text is "" there), so a missing value is told from an empty one."""
    return [f"meta/{name}" for name in names] + [absent_mask(name) for name in names]


def absent_mask(name: str) -> str:
    return f"meta_absent/{name}"


def absent_before_masks(texts) -> np.ndarray:
    """The absence mask of a file made before masks existed (0.3.0): it stored a missing value as
    "", so "" is read as missing (resume and merge give such files their mask by this rule)."""
    return np.asarray([t == "" for t in texts], np.uint8)


def flat_datasets(settings: StoreSettings) -> list[str]:
    """Flat (Σ tokens, D) datasets, indexed through their offset and count datasets."""
    return [s.name for s in settings.arrays if s.ragged]


# -- one batch for the writer -------------------------------------------------------------
@dataclass
class Rows:
    """One batch for the writer: n images that succeeded and the failures beside them."""

    keys: list[str]
    root_index: np.ndarray  # (n,) int32, into the file's roots
    image_size: np.ndarray  # (n, 2) int32
    # dataset name → values: (n, *shape), or (Σ T_i, W) for a flat dataset; "mean" (n, D) when
    # tokens are unpooled. Numpy arrays, or torch tensors until to_host().
    arrays: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # flat dataset → (n,) int32 tokens per image
    grid_thw: np.ndarray | None = None  # (n, 3) int32
    failed_keys: list[str] = field(default_factory=list)
    failed_root_index: list[int] = field(default_factory=list)
    failed_errors: list[str] = field(default_factory=list)
    meta: dict[str, list[str]] = field(default_factory=dict)  # name → text per image (meta/<name>)
    nonfinite: object = None  # images with inf/NaN tokens, counted where they were made (int(·) reads it)
    ready: object = None  # a copy's event (.synchronize()) to wait for before reading the arrays, or None
    release: Callable[[], None] | None = None  # gives the arrays' buffers back once they are written

    @property
    def tokens(self):
        return self.arrays["tokens"]

    def nonfinite_rows(self) -> int:
        """Images whose tokens hold inf or NaN, as counted where the rows were made (batching.py).
        Call on host rows."""
        return int(self.nonfinite) if self.nonfinite is not None else 0

    def to_host(self) -> "Rows":
        """The same rows with every array in host memory (the encoder may hand over device tensors)."""
        def host(a):
            return _tensor_to_numpy(a) if _is_tensor(a) else a

        return dataclasses.replace(self, arrays={k: host(v) for k, v in self.arrays.items()},
                                   nonfinite=host(self.nonfinite))

    def nbytes(self) -> int:
        arrays = [self.image_size, self.root_index, *self.arrays.values(), *self.counts.values()]
        texts = self.keys + self.failed_keys + self.failed_errors + [t or "" for v in self.meta.values() for t in v]
        strings = sum(len(k) + 16 for k in texts)
        return sum(a.nbytes for a in arrays) + strings


def _tensor_to_numpy(tensor) -> np.ndarray:
    """A torch tensor's values in host memory; bfloat16 (which numpy lacks) as ml_dtypes.bfloat16, bit for bit."""
    tensor = tensor.cpu()
    if str(tensor.dtype) != "torch.bfloat16":
        return tensor.numpy()
    int16 = sys.modules["torch"].int16  # torch is loaded: this is one of its tensors
    return tensor.view(int16).numpy().view(numpy_dtype("bfloat16"))


def _is_tensor(value) -> bool:
    """A torch tensor, without importing torch here (reading a file must not load it)."""
    return type(value).__module__.partition(".")[0] == "torch" and hasattr(value, "cpu")


def devices_joined(*records: str) -> str:
    """The ``device`` attribute of rows made on several devices: each once, in order ("cuda:0, cpu")."""
    seen: list[str] = []
    for record in records:
        seen += [d for d in (part.strip() for part in str(record).split(",")) if d and d not in seen]
    return ", ".join(seen)
