"""Nearest neighbours by cosine similarity over a file's pooled vectors, exact, in blocks, or
through a faiss index built from the file (consumers/index.py) when one is given or lies beside it.

The vectors are ``mean`` for unpooled files and ``tokens`` for pooled ones (N, D). They are read
``block`` rows at a time, so millions of rows never have to fit in memory at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from vitcore.errors import UsageError, VitExtractError
from vitcore.consumers.tokens import TokenFile
from vitcore.consumers.visualize import as_encoder_saw_it, placeholder, row_pixel_limit, sheet
from vitcore.encoders import registry
from vitcore.imaging.video import is_video_name
from vitcore.inputs.base import open_regular
from vitcore.store import weights_identity


@dataclass
class Hit:
    rank: int
    key: str
    score: float
    row: int


def top_k_cosine(blocks, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Exact top-k rows by cosine similarity to ``query`` over an iterable of (N_i, D) blocks.

    Returns (row, score) pairs, best first; ties keep the lower row first. Rows holding inf or NaN
    are left out (they have no direction to compare), as an index leaves them out.
    """
    q = query.astype(np.float32).ravel()
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    best_rows = np.empty(0, dtype=np.int64)
    best_scores = np.empty(0, dtype=np.float32)
    start = 0
    for block in blocks:
        x = np.asarray(block, dtype=np.float32)  # (n, D)
        finite = np.isfinite(x).all(axis=1)
        with np.errstate(all="ignore"):  # the non-finite rows, dropped just below
            norms = np.maximum(np.linalg.norm(x, axis=1), 1e-12)
            scores = np.clip((x @ q) / norms, -1.0, 1.0)  # (n,); rounding can reach 1 + 1e-7
        rows = np.arange(start, start + len(x), dtype=np.int64)[finite]
        scores = scores[finite]
        start += len(x)
        best_rows = np.concatenate([best_rows, rows])
        best_scores = np.concatenate([best_scores, scores.astype(np.float32)])
        if len(best_rows) > k:
            keep = np.lexsort((best_rows, -best_scores))[:k]  # by score desc, then row asc
            best_rows, best_scores = best_rows[keep], best_scores[keep]
    order = np.lexsort((best_rows, -best_scores))
    return [(int(best_rows[i]), float(best_scores[i])) for i in order[:k]]


def query_vector(f: TokenFile, query: str, max_image_pixels: int | None = None) -> tuple[np.ndarray, str]:
    """The vector for QUERY: a key already in the file, or an image file encoded as the file was
    (the original of a row too; ``max_image_pixels``: as run's option), or the root-qualified key of
    a row whose original is gone."""
    if f.stores_key(query):
        vector, kind = f.mean(query).astype(np.float32), "key"
    elif os.path.isfile(query):
        vector, kind = encode_like(f, query, max_image_pixels), "image"
    elif query in f:
        vector, kind = f.mean(query).astype(np.float32), "key"
    else:
        if f.failure_reason(query) is not None:
            raise UsageError(f.absent(query))
        if os.path.isdir(query):
            raise UsageError(f"{query} is a folder: give a key of {f.path} or one image file")
        raise UsageError(f"{query!r} is neither a key of {f.path} nor an image file")
    if not np.isfinite(vector).all():
        raise VitExtractError(f"the vector of {query!r} is not finite (inf or NaN); see `vit-extract info {f.path}`")
    return vector, kind


def _readable_query(image_path: str, max_image_pixels: int | None) -> None:
    """A query picture's header read (clips are read whole later): an empty, broken or foreign file
    refused in one line before any model is built."""
    if is_video_name(image_path):
        return
    from vitcore.imaging.decode import open_picture, pixel_limit

    try:
        with open(image_path, "rb") as handle, pixel_limit(max_image_pixels), open_picture(handle):  # (over it: an
            pass                                                                     # error, not Pillow's warning)
    except Exception as err:
        raise _unreadable_query(image_path, err, max_image_pixels) from None


def _unreadable_query(image_path: str, err: BaseException, max_image_pixels: int | None) -> VitExtractError:
    """A query that holds no picture or clip is a usage mistake (exit 2, as a FILE that is not an
    output), and so is one over the pixel limit (the option raises it) or in a format this
    installation cannot read (HEIC); one that holds a picture it reads but does not decode (cut
    short, damaged) is a fault (exit 1)."""
    from vitcore.imaging.decode import is_over_pixel_limit
    from vitcore.imaging.loader import describe_error
    from vitcore.imaging.sniff import HEAD_BYTES, content_kind, decodes

    reason = describe_error(err, max_image_pixels, "similar")
    try:
        with open(image_path, "rb") as handle:
            head = handle.read(HEAD_BYTES)
    except OSError as again:  # gone or unreadable since it was found
        return UsageError(f"cannot read {image_path}: {again.strerror or again}")
    kind = content_kind(head)
    if is_over_pixel_limit(err) or (kind is not None and kind[0] == "picture" and not decodes(kind[1])):
        return UsageError(f"cannot read {image_path}: {reason}")
    if not head:
        return UsageError(f"cannot read {image_path}: an empty file")
    if kind is None:
        return UsageError(f"cannot read {image_path}: not a picture or clip ({reason})")
    if kind[0] == "video" and not is_video_name(image_path):  # a clip named as a picture, read as one
        return UsageError(f"cannot read {image_path}: it holds a video clip ({kind[1]}), not a picture (rename it, "
                          "e.g. .mp4, for a family that reads clips)")
    return VitExtractError(f"cannot read {image_path}: a damaged {kind[1]} file ({reason})")


def encode_like(f: TokenFile, image_path: str, max_image_pixels: int | None = None) -> np.ndarray:
    """Encode one image with the encoder, weights and preprocessing recorded in the file → (D,),
    through the same batching path as a run (on the CPU, in float32); ``max_image_pixels`` as run's."""
    import torch  # torch: only when a new image is encoded (`similar` on a key needs none)

    from vitcore.imaging.decode import pixel_limit
    from vitcore.imaging.loader import collate
    from vitcore.inputs.files import Source
    from vitcore.run.batching import BatchRunner
    from vitcore.run.settings import store_settings

    settings = f.settings
    family = registry.for_record(settings["encoder"])
    if is_video_name(image_path) and not family.takes_video:
        raise UsageError(f"{image_path} is a video clip, and {f.path} was made by {family.name}, which reads pictures "
                         "only (clips are read by the Qwen-VL families)")
    _readable_query(image_path, max_image_pixels)  # before the encoder is built: a bad query is said at once
    device = torch.device("cpu")
    built = family.build(family.rebuild(settings, f.path), device, torch.float32)
    if built.weights.identity() != weights_identity(settings["weights"]):
        raise VitExtractError(f"{built.weights.path} has changed since {f.path} was made; "
                              "cannot encode a new image as its rows were")
    source = Source(path=image_path, key=os.path.basename(image_path), root_index=0)
    try:
        with source.open() as handle, pixel_limit(max_image_pixels):
            pixels, size, *_ = built.loader.load(handle)  # (a loader may add its own text: not needed here)
    except Exception as err:
        raise _unreadable_query(image_path, err, max_image_pixels) from None
    pooling = settings.get("pooling", "none")
    runner = BatchRunner(built, store_settings(built, pooling, "float32", device, torch.float32), device)
    with torch.inference_mode():
        rows = runner(collate([(0, pixels, size, None, {})]), [source])  # (index, pixels, size, error, meta)
    return rows.arrays["mean" if pooling == "none" else "tokens"][0]


@dataclass
class Searched:
    """How `similar` searched: through an index (``index``: its path) or exactly; ``note`` says why an
    index found beside the file was not used."""

    method: str  # "index" or "exact"
    index: str | None = None
    described: str = ""  # the index in one line: kind, tuned parameter, measured recall
    note: str = ""

    def describe(self) -> str:
        """One line for the CLI: "searched exactly" or "searched through the hnsw index out.faiss (…)"."""
        shown = f"searched through the {self.described}" if self.method == "index" else "searched exactly"
        return f"{shown} ({self.note})" if self.note else shown


class Found(tuple):
    """(hits, kind) as `similar` always returned, unpacked as two, with ``searched`` added:
    ``hits, kind = similar(...)`` keeps working; ``similar(...).searched`` says how."""

    def __new__(cls, hits: list[Hit], kind: str, searched: Searched):
        found = super().__new__(cls, (hits, kind))
        found.hits, found.kind, found.searched = hits, kind, searched
        return found


def similar(path: str, query: str, k: int = 10, block: int = 65536, index=None,
            max_image_pixels: int | None = None) -> Found:
    """The k rows of ``path`` most similar to ``query``, best first, and how the query was read.

    ``index``: a faiss index built from this file (vit-extract index), refused if the file changed
    since; None: the one beside the file (out.h5 → out.faiss) if there is one that still matches,
    else exact search; False: exact search."""
    if k < 1:
        raise UsageError("-k must be at least 1")
    with TokenFile(path) as f:
        if not len(f):
            raise VitExtractError(f"{path} has no rows to search")
        vector, kind = query_vector(f, query, max_image_pixels)
        loaded, searched = _chosen_index(f, path, index)
        if loaded is not None:
            ranked = loaded.search(f, vector, k)[0]
            key = loaded.key  # the keys recorded with the index (the same file: checked)
            if len(ranked) < min(k, len(loaded.rows)):  # HNSW or IVF can come back short (e.g. on many equal vectors)
                searched = Searched("exact", note=f"the {loaded.kind} index {loaded.path} gave {len(ranked)} of the "
                                                  f"{min(k, len(loaded.rows))} hits asked for, so the search was exact")
                loaded = None
        if loaded is None:
            dataset = f.vectors_dataset()
            ranked = top_k_cosine((batch for _, batch in f.iter_batches(block, dataset)), vector, k)
            key = f.shown_key  # a key stored under several roots is shown with its root
        hits = [Hit(rank=r + 1, key=key(row), score=score, row=row) for r, (row, score) in enumerate(ranked)]
        return Found(hits, kind, searched)


def _chosen_index(f: TokenFile, path: str, index):
    """(the LoadedIndex to search through or None, how the search goes). A given index must match
    the file; one found beside it that does not is passed over, with a note."""
    if index is False:
        return None, Searched("exact")
    from vitcore.consumers.index import IndexMismatch, index_beside, load_index, sidecar_path

    if index is not None:
        loaded = load_index(os.fspath(index), f)  # a mismatch is refused
        return loaded, Searched("index", loaded.path, loaded.describe())
    beside = index_beside(path)
    if not (os.path.isfile(beside) and os.path.isfile(sidecar_path(beside))):
        return None, Searched("exact")
    try:
        loaded = load_index(beside, f)
    except IndexMismatch as error:
        return None, Searched("exact", note=f"{beside} was not used: {error}")
    except VitExtractError as error:  # faiss missing, an unreadable index: exact search still answers
        return None, Searched("exact", note=f"{beside} was not used: {error}")
    return loaded, Searched("index", loaded.path, loaded.describe())


def hits_sheet(path: str, hits: list[Hit], query: str, kind: str, columns: int = 4,
               max_image_pixels: int | None = None):
    """A contact sheet of the query (read under ``max_image_pixels``, as similar read it) and its
    hits (pictures found through the recorded roots)."""
    cells = []
    with TokenFile(path) as f:
        if kind == "image":
            query_picture = as_encoder_saw_it(lambda: open_regular(query), f.as_seen, max_image_pixels)
        else:  # framed as the encoder saw it
            query_picture = as_encoder_saw_it(lambda: f.open_original(query), f.as_seen, row_pixel_limit(f, query))
        cells.append(([query_picture or placeholder("query not found")], f"query: {os.path.basename(query)}"))
        for hit in hits:
            picture = (as_encoder_saw_it(lambda: f.open_original(hit.row), f.as_seen,  # noqa: B023 (called at once)
                                         row_pixel_limit(f, hit.row)) or placeholder("original not found"))
            cells.append(([picture], f"{hit.rank}. {hit.key}  {hit.score:.4f}"))
    return sheet(cells, columns)
