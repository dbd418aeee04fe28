"""Reading an output file: rows by index or key, batches, settings, failures (torch-free)."""

from __future__ import annotations

import json
import os
import unicodedata
from typing import Iterator

import h5py
import numpy as np

from vitcore.errors import UsageError, VitExtractError, one_line
from vitcore.inputs.base import escape_key, source_path, special_file
from vitcore.inputs.remote import is_url, public_url
from vitcore.inputs.discover import open_original
from vitcore.store.encoding import StoredArray, readable, stored_dtype
from vitcore.store.h5open import h5_file
from vitcore.store.lock import run_holding
from vitcore.store.schema import absent_mask, decoded, ragged_index_names


_KEY_INDEXES: dict = {}  # (path, size, mtime, rows) → key → rows; a few file versions at most
OPEN_FILES_MARGIN = 64  # descriptors kept for everything else a process has open


def allow_open_files(files: int, what: str) -> None:
    """Raise this process's open-file limit as far as the system allows so that ``files`` files can
    be open at once (besides OPEN_FILES_MARGIN others), or say in one line that they cannot."""
    try:
        import resource
    except ImportError:  # not a POSIX system: nothing to raise or check
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = files + OPEN_FILES_MARGIN
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise VitExtractError(f"{what} needs {needed} open files, but this system allows {soft} "
                              f"(ulimit -n; the hard limit is {hard})")


class BeingWritten(VitExtractError):
    """A run, or another program, holds the file open for writing (HDF5's file lock)."""


def writer_of(path: str) -> tuple[str, str]:
    """Who has ``path`` open for writing: ("a vit-extract run", a sentence naming it from its lock
    file) or ("another program", …): a notebook's h5py.File(path, "a"), say."""
    holder = run_holding(path)
    if holder:
        return "a vit-extract run", f"a vit-extract run is writing it ({holder})"
    return "another program", "another program has it open for writing"


def open_for_reading(path: str, verb: str) -> h5py.File:
    if is_url(path):
        return _open_url(path, verb)
    special = special_file(path)
    if special is not None:  # (h5py would wait on a named pipe for ever)
        raise UsageError(f"cannot {verb} {path}: it is {special}, not a file")
    try:
        return h5_file(path, "r")
    except BlockingIOError:
        raise BeingWritten(f"cannot {verb} {path}: {writer_of(path)[1]} (HDF5's file lock); try again when it has "
                           "finished") from None
    except PermissionError as err:
        raise VitExtractError(f"cannot {verb} {path}: {os.strerror(err.errno) if err.errno else one_line(err, 200)}") from None
    except OSError as err:
        with open(path, "rb") as handle:
            raise _unreadable(verb, path, err, handle) from None


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _unreadable(verb: str, shown: str, err: OSError, handle) -> VitExtractError:
    """h5py could not open it. No HDF5 signature where HDF5 puts one (offset 0, 512, 1024, …): the
    user named a file that is not an HDF5 file (a usage refusal, as a folder is). A signature: an
    HDF5 file that is damaged (cut short by a crash or a copy): a fault, exit 1."""
    offset, signed = 0, False
    while offset < 1 << 20 and not signed:
        handle.seek(offset)
        head = handle.read(len(HDF5_SIGNATURE))
        if len(head) < len(HDF5_SIGNATURE):
            break
        signed, offset = head == HDF5_SIGNATURE, max(512, offset * 2)
    text = one_line(err, 200)
    if signed:
        return DamagedFile.of(verb, shown, text)
    return UsageError(f"cannot {verb} {shown}: not a readable HDF5 file ({text})")


class DamagedFile(VitExtractError):
    """An HDF5 file that does not open, its signature there: cut short by a crash or a copy (exit 1).
    ``detail``: HDF5's words for the damage."""

    detail = ""

    @classmethod
    def of(cls, verb: str, shown: str, text: str) -> "DamagedFile":
        wrapper = "Unable to synchronously open file ("
        detail = text[len(wrapper):-1] if text.startswith(wrapper) and text.endswith(")") else text
        error = cls(f"cannot {verb} {shown}: a damaged HDF5 file ({detail})")
        error.detail = detail
        return error


def _open_url(url: str, verb: str) -> h5py.File:
    """A file in object storage read in place: h5py reads through fsspec's file object, which fetches
    the byte ranges HDF5 asks for (a summary of a large file reads its metadata, not its tokens)."""
    from vitcore.inputs.remote import filesystem, secret_free

    fs, path = filesystem(url)
    try:
        if url.endswith("/") or fs.isdir(path):
            raise UsageError(f"{public_url(url)} is a prefix (a folder): name the file in it")
        handle = fs.open(path, "rb", block_size=1 << 20)
    except UsageError:
        raise
    except FileNotFoundError:
        raise UsageError(f"{public_url(url)} does not exist") from None
    except Exception as err:
        raise VitExtractError(f"cannot {verb} {public_url(url)} ({type(err).__name__}: "
                              f"{one_line(secret_free(str(err), url), 200)})") from None
    try:
        return h5py.File(handle, "r")
    except OSError as err:
        try:
            raise _unreadable(verb, public_url(url), OSError(secret_free(str(err), url)), handle) from None
        finally:
            handle.close()


class AmbiguousKey(UsageError, KeyError):
    """A key stored under several roots (a/x.jpg and b/x.jpg are both "x.jpg"): it names no one row."""

    def __str__(self) -> str:  # the message as written, not KeyError's quoted repr
        return str(self.args[0])


class StoredTokens:
    """Read a vit-extract output: rows by index or key, batches, settings, failures; everything the
    file itself says. What only its encoder family knows (the token grid, a summary of the encoder)
    is added by consumers.tokens.TokenFile, which vitcore.open_tokens gives.

        with vitcore.open_tokens("out.h5") as f:
            x = f["cat.jpg"]          # (T, D) numpy array, or (D,) when pooled
    """

    def __init__(self, path: str | os.PathLike, check_shards: bool = True, while_written: bool = False):
        """``while_written``: a file a run is writing now is read anyway, without HDF5's lock: the
        writer flushes every batch before it advances ``committed``, so the committed rows are whole
        (``being_written`` says so; a read that meets a flush half-way fails, and can be tried again)."""
        self.path = os.fspath(path)
        self.being_written = False
        try:
            self.h5 = open_for_reading(self.path, "read")
        except BeingWritten:
            if not while_written:
                raise
            self.h5 = h5py.File(self.path, "r", locking=False)
            self.being_written = True
        missing = [a for a in ("schema_version", "committed", "roots", "encoder") if a not in self.h5.attrs]
        if missing or "tokens" not in self.h5 or "paths" not in self.h5:
            self.h5.close()
            raise UsageError(
                f"{public_url(self.path)} is not a vit-extract output file (missing {', '.join(missing) or 'datasets'})"
            )
        self._filters_ready = False  # a compressed file's filter registered (array())
        self._keys: list[str] | None = None
        self._roots: list[str] | None = None
        self._index: dict[str, int] | None = None
        self._failure_reasons: dict[str, str] | None = None  # failed key (and ROOT/KEY) → its reason
        self._nfc_index: dict[str, list[int]] | None = None  # non-ASCII keys composed (NFC) → rows
        if check_shards and self.h5.attrs.get("merged") == "virtual":
            shards = json.loads(self.h5.attrs["shards"])
            # HDF5 keeps every shard it reads through open, and reads one it cannot open as the
            # fill value (NaN) without a word: make sure they can all be open at once.
            try:
                allow_open_files(len(shards), f"reading {self.path}, a virtual view over {len(shards)} shard files")
            except VitExtractError as err:
                self.h5.close()
                raise VitExtractError(f"{err}; `vit-extract merge` them again without --virtual: one self-contained file") from None
            # HDF5 reads a missing shard as NaN, or even a same-named file in the working directory:
            # refuse unless every shard is the very file that was merged.
            bad = [s for s in self._shard_states(shards) if s["state"] != "complete"]
            if bad:
                self.h5.close()
                raise VitExtractError(
                    f"{self.path} reads through shard files that are {bad[0]['state']} since the merge "
                    f"({', '.join(s['file'] for s in bad[:3])}); restore them beside it, or merge again"
                )

    def __enter__(self) -> "StoredTokens":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.h5.close()

    def __len__(self) -> int:
        return int(self.h5.attrs["committed"])

    @property
    def keys(self) -> list[str]:
        if self._keys is None:
            n = len(self)
            self._keys = list(self.h5["paths"].asstr()[:n]) if n else []
        return self._keys

    def _key_rows(self) -> dict[str, list[int]]:
        """key → its rows (several when it was found under several roots), built once per file
        version and shared by every reader of it in this process (a serving loop rereads no keys)."""
        if self._index is None:
            stat = os.stat(self.path)
            version = (os.path.abspath(self.path), stat.st_size, stat.st_mtime_ns, len(self))
            if version not in _KEY_INDEXES:
                index: dict[str, list[int]] = {}
                for i, k in enumerate(self.keys):
                    index.setdefault(k, []).append(i)
                if len(_KEY_INDEXES) >= 4:
                    _KEY_INDEXES.pop(next(iter(_KEY_INDEXES)))
                _KEY_INDEXES[version] = index
            self._index = _KEY_INDEXES[version]
        return self._index

    def rows_named(self, key: str) -> list[int]:
        """Every row stored under ``key`` (one, unless it was found under several roots), or the
        one row of a root-qualified key (the root joined with the key: the input's original path).
        A name as it is on disk finds its row too (a stored key escapes a literal backslash)."""
        rows = self._named(key)
        if not rows:
            raise KeyError(f"{key!r} is not a row of {self.path}")
        return rows

    def _qualified_rows(self, name: str, composed: bool = False) -> list[int]:
        """The rows of ROOT/KEY; ``composed``: compared in Unicode's composed form (NFC), both sides."""
        name = os.path.abspath(name)  # a root may be given as the working directory sees it
        name = _nfc(name) if composed else name
        rows = []
        for i, root in enumerate(self.roots):  # roots may nest (/data and /data/a): each is tried
            prefix = os.path.join(_nfc(root) if composed else root, "")
            if name.startswith(prefix):
                key = name[len(prefix):]
                found = self._key_rows().get(key, []) or (self._normalised_rows().get(key, []) if composed else [])
                rows += [r for r in found if int(self.h5["root_index"][r]) == i]
        return rows

    @property
    def roots(self) -> list[str]:
        """The recorded roots (absolute); a key is relative to roots[root_index[row]]."""
        if self._roots is None:
            self._roots = json.loads(self.h5.attrs["roots"])
        return self._roots

    def qualified_key(self, row: int) -> str:
        """A row's root joined with its key: the form that names it alone when its key is stored twice."""
        i = self.row_number(row)
        return os.path.join(self.roots[int(self.h5["root_index"][i])], self.keys[i])

    def shown_key(self, row: int) -> str:
        """A row's key as a person should see it: qualified by its root when the key names several rows."""
        key = self.keys[self.row_number(row)]
        alone = len(self._key_rows()[key]) == 1 and (key.isascii() or len(self._normalised_rows()[_nfc(key)]) == 1)
        return key if alone else self.qualified_key(row)

    def index(self, key: str) -> int:
        """The row of ``key``. A key stored under several roots is refused (AmbiguousKey), listing
        the root-qualified keys that each name one of its rows."""
        rows = self.rows_named(key)
        if len(rows) > 1:
            named = ", ".join(f"{self.qualified_key(r)} (row {r})" for r in rows[:4]) + (" …" if len(rows) > 4 else "")
            raise AmbiguousKey(f"{key!r} names {len(rows)} rows of {self.path}, found under different roots: {named}; "
                               "give the one you mean as ROOT/KEY (its original path)")
        return rows[0]

    def stores_key(self, key: str) -> bool:
        """Whether ``key`` is a stored key as it is (not its root-qualified form)."""
        return key in self._key_rows()

    def __contains__(self, key: str | bytes) -> bool:
        return bool(self._named(os.fsdecode(key) if isinstance(key, bytes) else key))

    def _named(self, key: str) -> list[int]:
        index = self._key_rows()
        rows = index.get(key) or index.get(escape_key(key)) or self._qualified_rows(key)
        if not key.isascii():  # é typed (NFC) for a key stored decomposed (NFD, macOS), or back; a key stored
            composed = self._normalised_rows().get(_nfc(key), [])  # both ways (two roots) names both rows
            if not rows:
                rows = composed or self._qualified_rows(key, composed=True)
            elif not os.path.isabs(key) and len(composed) > len(rows):
                rows = composed
        return rows

    def _normalised_rows(self) -> dict[str, list[int]]:
        """Non-ASCII keys in Unicode's composed form (NFC) → their rows, built on first use."""
        if self._nfc_index is None:
            self._nfc_index = {}
            for key, rows in self._key_rows().items():
                if not key.isascii():
                    self._nfc_index.setdefault(_nfc(key), []).extend(rows)
        return self._nfc_index

    def row_number(self, item: int | str | bytes) -> int:
        """The row of a key (str, or a file name's bytes) or a row number (negative counts from the end)."""
        if isinstance(item, bytes):
            item = os.fsdecode(item)  # (found as a name on disk is: escaped where it is not UTF-8)
        i = self.index(item) if isinstance(item, str) else int(item)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {item} is out of range for {n} rows")
        return i % n

    def __getitem__(self, item: int | str) -> np.ndarray:
        return self.tokens(item)

    @property
    def ragged(self) -> bool:
        return "token_offset" in self.h5

    def read(self, name: str, item: int | str) -> np.ndarray:
        """One image's rows of ``name``: a row, or its slice of a flat (Σ tokens, D) dataset."""
        i = self.row_number(item)
        if name not in self.h5:
            held = ["tokens", *(f"layers/{k}" for k in self.layers),
                    *(f"features/{f[0]}" for f in self.settings.get("features") or [])]
            raise UsageError(f"{self.path} holds no {name}; it holds {', '.join(held)}")
        offsets, counts = ragged_index_names(name)
        if offsets in self.h5:
            start = int(self.h5[offsets][i])
            return self.array(name)[start : start + int(self.h5[counts][i])]
        return self.array(name)[i]

    def array(self, name: str) -> StoredArray:
        """A large dataset (tokens, mean, layers/K, features/<name>) for reading rows as stored:
        bfloat16 ones as ml_dtypes.bfloat16 (h5py alone would convert them to float32). A compressed
        file's filter is registered first (or one line says which package it needs); what only reads
        the file's layout and attributes (`info`) needs none."""
        if not self._filters_ready:  # once per open file: every row read comes through here
            readable(str(self.h5.attrs.get("compression", "none")), self.path)
            self._filters_ready = True
        return StoredArray(self.h5[name])

    def tokens(self, item: int | str) -> np.ndarray:
        """(T, D) tokens (T may differ per image when ragged), or (D,) when pooled."""
        return self.read("tokens", item)

    def feature(self, name: str, item: int | str) -> np.ndarray:
        """An extra stored feature of one image (``features/<name>``)."""
        return self.read(f"features/{name}", item)

    def mean(self, item: int | str) -> np.ndarray:
        """The image's mean token (the pooled vector itself for pooled files)."""
        return self.array(self.vectors_dataset())[self.row_number(item)]

    def iter_batches(self, batch_size: int = 256, dataset: str = "tokens") -> Iterator[tuple[list[str], np.ndarray]]:
        """(keys, array) for consecutive committed rows of ``dataset`` (tokens, mean, layers/K);
        for a ragged dataset the array is a list of per-image (T_i, D) arrays."""
        data, n = self.array(dataset), len(self)
        offsets, counts = ragged_index_names(dataset)
        ragged = offsets in self.h5
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if ragged:
                firsts, sizes = self.h5[offsets][start:stop], self.h5[counts][start:stop]
                block = data[int(firsts[0]) : int(firsts[-1] + sizes[-1])] if stop > start else data[0:0]
                base = int(firsts[0]) if stop > start else 0
                yield self.keys[start:stop], [block[o - base : o - base + c] for o, c in zip(firsts, sizes)]
            else:
                yield self.keys[start:stop], data[start:stop]

    def original_path(self, item: int | str) -> str:
        """The path of the input a row came from, as open() takes it (a name that is not UTF-8 keeps
        its bytes as surrogate escapes, as os.fsdecode gives them; os.fsencode gives the bytes back)."""
        i = self.row_number(item)
        return os.fsdecode(source_path(self.roots[int(self.h5["root_index"][i])], self.keys[i]))

    def open_original(self, item: int | str):
        """The original bytes of a row's input as a binary file object: the image file, the tar
        member or the Parquet row it was read from. OSError when it is gone."""
        i = self.row_number(item)
        settings = self.settings
        return open_original(settings["roots"][int(self.h5["root_index"][i])], self.keys[i], settings.get("image_column"))

    def source_bytes(self, item: int | str) -> bytes:
        """The original bytes of a row's input (see open_original)."""
        with self.open_original(item) as handle:
            return handle.read()

    @property
    def meta_names(self) -> list[str]:
        """The text kept beside each row (meta/<name>: --keep sidecars, --columns)."""
        return list(self.settings.get("meta") or [])

    def meta(self, name: str, item: int | str | None = None):
        """meta/<name> of one row, or of every row (a list) when ``item`` is None; None where the
        row has no such text (no sidecar, a null value), "" where it is empty."""
        if name not in self.meta_names:
            raise KeyError(f"{self.path} keeps no {name!r} (it keeps: {', '.join(self.meta_names) or 'nothing'})")
        dataset = self.h5[f"meta/{name}"].asstr()
        mask = self.h5.get(absent_mask(name))  # files before 0.4 have none: "" there may be either
        if item is None:
            if not len(self):
                return []
            texts = list(dataset[: len(self)])
            absent = mask[: len(self)] if mask is not None else np.zeros(len(texts), np.uint8)
            return [None if gone else text for text, gone in zip(texts, absent)]
        row = self.row_number(item)
        return None if mask is not None and mask[row] else dataset[row]

    @property
    def settings(self) -> dict:
        """The root attributes, with JSON values decoded."""
        return decoded(self.h5.attrs)

    @property
    def failures(self) -> list[tuple[str, str]]:
        n = int(self.h5.attrs["failed_committed"])
        if not n:
            return []
        return list(zip(self.h5["failed/paths"].asstr()[:n], self.h5["failed/errors"].asstr()[:n]))

    def failure_reason(self, key: str) -> str | None:
        """The recorded reason ``key`` failed when the file was made (it has no row), or None. The key
        is taken as rows' keys are: as stored, escaped as stored, or joined to its root (ROOT/KEY)."""
        if self._failure_reasons is None:
            reasons: dict[str, str] = {}
            failures = self.failures  # (read from the file at each use)
            roots = self.h5["failed/root_index"][: len(failures)] if failures else []
            for (path, error), root in zip(failures, roots):
                for name in (path, os.path.join(self.roots[int(root)], path)):
                    reasons.setdefault(name, error)
                    if not name.isascii():  # found typed composed or decomposed (as keys are)
                        reasons.setdefault(_nfc(name), error)
            self._failure_reasons = reasons
        reasons = self._failure_reasons
        found = reasons.get(key) or reasons.get(escape_key(key)) or reasons.get(os.path.abspath(key))
        if found is None and not key.isascii():
            found = reasons.get(_nfc(key)) or reasons.get(_nfc(os.path.abspath(key)))
        return found

    def absent(self, key: str) -> str:
        """Why ``key`` has no row, in words: it failed (and why), or it is not in the file."""
        reason, shown = self.failure_reason(key), public_url(self.path)
        if reason is None:
            return f"{key!r} is not in {shown}"
        return f"{key!r} failed when {shown} was made, so it has no row: {reason}"

    @property
    def token_shape(self) -> tuple[int, ...]:
        """Per image; for ragged tokens (-1, D): the count varies (num_tokens)."""
        shape = tuple(self.h5["tokens"].shape[1:])
        return (-1, *shape) if self.ragged else shape

    def vectors_dataset(self) -> str:
        """The (N, D) dataset to search: ``mean`` for unpooled files, ``tokens`` when pooled."""
        return "mean" if "mean" in self.h5 else "tokens"

    @property
    def layers(self) -> list[int]:
        return [int(k) for k in self.settings["layers"]]

    def describe(self, max_failures: int | None = None) -> dict:
        """What `vit-extract info` shows: a JSON-ready summary of the file."""
        settings = self.settings
        failures = self.failures
        datasets = {}
        self.h5.visititems(
            lambda name, obj: datasets.__setitem__(name, {"shape": list(obj.shape), "dtype": stored_dtype(obj)})
            if isinstance(obj, h5py.Dataset) else None
        )
        return {
            "file": public_url(self.path),  # (a local path as it is)
            "rows": len(self),
            "complete": bool(settings.get("complete")),
            "being_written": self.being_written,
            "written_by": writer_of(self.path)[0] if self.being_written else None,
            "token_shape": list(self.token_shape),
            "out_dtype": settings.get("out_dtype"),
            "compression": settings.get("compression", "none"),
            "pooling": settings.get("pooling"),
            "layers": settings.get("layers"),
            "encoder": settings.get("encoder"),
            "projector": settings.get("projector"),
            "weights": settings.get("weights"),
            "preprocessing": settings.get("preprocessing"),
            "compute_dtype": settings.get("compute_dtype"),
            "device": settings.get("device"),
            "created": settings.get("created"),
            "vit_extract_version": settings.get("vit_extract_version"),
            "schema_version": settings.get("schema_version"),
            "roots": settings.get("roots"),
            "failed": len(failures),
            # Each with its root, so that the same key under two roots, or a key relative to a folder
            # that is not the working directory, is found.
            "failures": [{"path": k, "error": e, "root": self.roots[i]} for (k, e), i in
                         zip(failures[:max_failures], self.h5["failed/root_index"][: len(failures[:max_failures])])],
            "untrained": settings.get("weights", {}).get("source") in ("untrained", "untrained file"),
            "datasets": datasets,
            "shard": settings.get("shard"),
            "merged": settings.get("merged"),
            "shards": self._shard_states(settings.get("shards")),
            "features": settings.get("features") or [],
            "meta": settings.get("meta") or [],
            "clips": self._clip_rows(settings.get("meta") or []),
            "image_columns_used": settings.get("image_columns_used") or [],
        }

    def _clip_rows(self, meta: list[str]) -> int:
        """Rows that are video clips: those with a recorded clip timing (meta/video is "" for a picture)."""
        if "video" not in meta:
            return 0
        texts = self.h5["meta/video"]
        step = 1 << 16  # read in slices: a file can hold millions of rows
        return sum(int(np.count_nonzero(texts[i:i + step].astype(bool))) for i in range(0, len(self), step))

    def _shard_states(self, shards: list[dict] | None) -> list[dict] | None:
        """For a merged file: each shard with its state now (a virtual file reads through them)."""
        if not shards:
            return None
        if self.h5.attrs.get("merged") == "copy":
            return [{**shard, "state": "copied (not needed)"} for shard in shards]
        folder = os.path.dirname(os.path.abspath(self.path))
        states = []
        for shard in shards:
            path = os.path.join(folder, shard["file"])
            state = "missing"
            if os.path.exists(path):
                try:
                    with h5_file(path, "r") as h5:
                        same = h5.attrs.get("run_id") == shard.get("run_id") and bool(h5.attrs.get("complete"))
                        same = same and int(h5.attrs["committed"]) == shard["rows"]
                    state = "complete" if same else "changed"
                except (OSError, KeyError):
                    state = "unreadable"
            states.append({**shard, "state": state})
        return states


def _nfc(text: str) -> str:
    """A key's composed form: the same name whether its accents were stored as one code point or two."""
    return unicodedata.normalize("NFC", text)
