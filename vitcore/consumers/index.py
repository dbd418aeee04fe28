"""A faiss index over a file's pooled vectors, for `similar` on files too large to search exactly.

The vectors are those `similar` searches (``mean`` of unpooled files, ``tokens`` of pooled ones),
read in blocks, as float32, L2-normalised (so inner product = cosine); rows that are not finite are
left out. The index's ids are the file's row numbers. Beside ``OUT.faiss`` a sidecar ``OUT.faiss.json``
records the file it was built from (its run_id and committed rows: the identity a search checks),
the kind, the tuned search parameter, the recall measured at build time and each row's key.

Kinds: ``flat`` (exact), ``hnsw`` (a graph over the flat vectors), ``ivf`` (inverted lists of flat
vectors), ``ivfpq`` (inverted lists of product-quantised codes). A search through an index picks
candidates; their scores are then computed exactly from the file (for ``ivfpq`` over a few times
k candidates, which makes up for the codes' loss), so a score is always the cosine `similar` prints
without an index. faiss is an optional dependency, imported only here and only when used.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from vitcore import __version__
from vitcore.consumers.search import top_k_cosine
from vitcore.consumers.tokens import TokenFile
from vitcore.errors import UsageError, VitExtractError
from vitcore.inputs.base import open_regular
from vitcore.store.output import check_output, output_target, read_as_output
from vitcore.system.units import shown_size

FORMAT = "vit-extract index"
FORMAT_VERSION = 1
KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
EXTRA = "pip install 'vit-extract[index]'"

FLAT_MAX_ROWS = 100_000  # auto: exact search up to here (10^5 × 1024 float32: 400 MB, ~10 ms a query)
HNSW_M = 32  # graph neighbours per node (faiss's HNSW32): 2·M int32 links a row at level 0
HNSW_EF_CONSTRUCTION = 80
EF_SEARCH_MAX = 4096  # efSearch ceiling while tuning
PQ_NBITS = 8  # bits per PQ sub-code (one byte)
RERANK_FACTORS = (4, 8, 16, 32, 64)  # ivfpq: candidates per wanted hit, re-scored exactly from the file
TRAIN_MAX_ROWS = 100_000  # k-means training sample (ivf, ivfpq), also kept under TRAIN_MAX_BYTES
TRAIN_MAX_BYTES = 1 << 30
READ_BLOCK = 16384  # rows read from the file at a time: (16384, D) float32 and its normalised copy
TIE = 1e-6  # scores this close to the k-th best tie with it (float32 rounding of equal vectors)
SCORE_BLOCK = 8192  # rows scored against the sample queries at a time: (queries, 8192) float32


class IndexMismatch(UsageError):
    """An index built from another version of the file (its run_id or committed rows differ): a
    refusal, like a --resume whose settings differ (exit 2)."""


def _faiss():
    """faiss, or a one-line error naming the extra that installs it."""
    try:
        import faiss
    except ImportError:
        raise VitExtractError(f"faiss is not installed; vector indexes need it: {EXTRA}") from None
    return faiss


def sidecar_path(index_path: str) -> str:
    return os.fspath(index_path) + ".json"


def index_beside(path: str) -> str:
    """Where `similar` looks for an index of ``path``: out.h5 → out.faiss."""
    return os.path.splitext(os.fspath(path))[0] + ".faiss"


@dataclass
class IndexReport:
    """What build_index did: the kind and why, the tuned parameters and the recall they measured."""

    kind: str
    reason: str  # one line: why this kind
    rows: int  # rows indexed
    excluded: int  # rows left out: not finite (inf or NaN)
    dim: int
    dataset: str  # the file's vectors: mean or tokens
    params: dict  # nlist/nprobe, M/efSearch, PQ m/nbits, rerank factor
    index_bytes: int
    recall: float  # recall@k of the tuned index, `queries` of the file's own rows as queries (flat: 1.0, exact)
    k: int
    target_recall: float
    queries: int  # rows of the file used as queries to measure recall (0 for flat)
    build_seconds: float
    source: str
    output: str
    sidecar: str

    def to_dict(self) -> dict:
        return asdict(self)


# ---- choosing a kind -----------------------------------------------------------------------------

def _nlist(rows: int) -> int:
    """Inverted lists: about 4·√rows, with at least 39 training rows each (faiss's minimum)."""
    return max(1, min(int(4 * math.sqrt(rows)), rows // 39, 65536))


def _pq_m_choices(dim: int) -> list[int]:
    """PQ sub-quantizers: divisors of dim, at most dim/2 (sub-vectors of 2+ values), largest first."""
    return sorted((m for m in range(1, dim + 1) if dim % m == 0 and (m <= dim // 2 or dim == 1)), reverse=True)


def _estimate(kind: str, rows: int, dim: int, pq_m: int = 0) -> int:
    """Bytes the index takes (in memory, about as on disk); ids are 8 bytes a row."""
    nlist = _nlist(rows)
    if kind == "flat":
        return rows * (4 * dim + 8)
    if kind == "hnsw":
        return rows * (4 * dim + 8 + int(2 * HNSW_M * 4 * 1.05) + 12)  # links: 2M at level 0, ~1/M above
    if kind == "ivf":
        return rows * (4 * dim + 8) + nlist * 4 * dim
    return rows * (pq_m * PQ_NBITS // 8 + 8) + nlist * 4 * dim + (1 << PQ_NBITS) * 4 * dim  # codes, centroids, codebooks


@dataclass
class _Plan:
    kind: str
    reason: str
    params: dict = field(default_factory=dict)


def choose(kind: str, rows: int, dim: int, max_memory: int | None) -> _Plan:
    """The kind to build (auto: by rows and the budget) and, for ivfpq, its code size; one line of why."""
    if kind not in KINDS:
        raise UsageError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    budget = "memory (no --max-index-memory given)" if max_memory is None else f"the budget {shown_size(max_memory)}"
    fits = lambda size: max_memory is None or size <= max_memory  # noqa: E731
    flat, hnsw = _estimate("flat", rows, dim), _estimate("hnsw", rows, dim)
    if kind == "auto":
        if rows <= FLAT_MAX_ROWS and fits(flat):
            kind, why = "flat", (f"{rows:,} rows ≤ {FLAT_MAX_ROWS:,} and their vectors ({shown_size(flat)}) "
                                 f"fit {budget}: exact search")
        elif fits(hnsw):  # (only past the row limit: the graph is larger than the flat vectors)
            kind, why = "hnsw", (f"{rows:,} rows > {FLAT_MAX_ROWS:,}; the vectors and the HNSW graph "
                                 f"({shown_size(hnsw)}) fit {budget}")
        elif fits(_estimate("ivf", rows, dim)):
            kind, why = "ivf", f"the vectors fit {budget}, but not with the HNSW graph ({shown_size(hnsw)})"
        else:
            kind, why = "ivfpq", f"the vectors ({shown_size(flat)}) do not fit {budget}"
    else:
        why = f"asked for (kind {kind})"
    if kind == "ivfpq":
        choices = _pq_m_choices(dim)
        sized = [m for m in choices if fits(_estimate("ivfpq", rows, dim, m))]
        if not sized:
            raise UsageError(f"{budget} is too small for {rows:,} rows even with 1-byte PQ codes "
                             f"({shown_size(_estimate('ivfpq', rows, dim, 1))}); raise it")
        # Without a budget: 4 values a byte (16× smaller than float32), a usual trade-off.
        m = sized[0] if max_memory is not None else next((c for c in choices if c <= max(1, dim // 4)), choices[-1])
        return _Plan(kind, f"{why}; {m}-byte PQ codes a row ({shown_size(_estimate('ivfpq', rows, dim, m))})", {"m": m})
    size = _estimate(kind, rows, dim)
    if not fits(size):
        raise UsageError(f"a {kind} index of {rows:,} × {dim} needs about {shown_size(size)}, over {budget}; "
                         "raise it or choose another kind (auto sizes one to the budget)")
    return _Plan(kind, why)


# ---- reading the file ----------------------------------------------------------------------------

def _normalised(block) -> tuple[np.ndarray, np.ndarray]:
    """(finite rows L2-normalised as float32 (n', D), the finite mask (n,))."""
    x = np.asarray(block, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1)
    x = x[finite]
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), finite


def _blocks(f: TokenFile, dataset: str, block: int):
    """(row numbers (n',), normalised finite vectors (n', D), rows left out) for each block of the file."""
    start = 0
    for _, batch in f.iter_batches(block, dataset):
        vectors, finite = _normalised(batch)
        rows = np.arange(start, start + len(finite), dtype=np.int64)[finite]
        start += len(finite)
        yield rows, vectors, int((~finite).sum())


def _gather(f: TokenFile, dataset: str, wanted: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The finite ones of the sorted rows ``wanted``, normalised: (rows (m,), vectors (m, D))."""
    rows_out, vectors_out = [], []
    for rows, vectors, _ in _blocks(f, dataset, block):
        keep = np.isin(rows, wanted)
        rows_out.append(rows[keep])
        vectors_out.append(vectors[keep])
    return np.concatenate(rows_out), np.concatenate(vectors_out)


class _ExactTopK:
    """The exact top-k rows for a few queries (Q, D), fed the file block by block."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries, self.k = queries, k
        self.rows = np.full((len(queries), 0), -1, dtype=np.int64)
        self.scores = np.empty((len(queries), 0), dtype=np.float32)

    def add(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        for s in range(0, len(rows), SCORE_BLOCK):
            scores = self.queries @ vectors[s : s + SCORE_BLOCK].T  # (Q, b)
            both_scores = np.concatenate([self.scores, scores], axis=1)
            both_rows = np.concatenate([self.rows, np.broadcast_to(rows[s : s + SCORE_BLOCK], scores.shape)], axis=1)
            if both_scores.shape[1] > self.k:
                keep = np.argpartition(-both_scores, self.k - 1, axis=1)[:, : self.k]
                both_scores = np.take_along_axis(both_scores, keep, 1)
                both_rows = np.take_along_axis(both_rows, keep, 1)
            self.scores, self.rows = both_scores, both_rows


def _recall_by_score(scores: np.ndarray, kth: np.ndarray, k: int) -> float:
    """recall@k from the exact scores of each query's k results (Q, k) and its k-th best exact score
    (Q,): a result counts when it scores at least the k-th best. Rows that tie (duplicate pictures:
    many rows, one vector) are then all true neighbours, whichever of them the index returns."""
    hits = np.minimum(k, (scores >= kth[:, None] - TIE).sum(axis=1))
    return float(hits.sum()) / (len(kth) * k)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top-k rows (Q, k) among its candidates (Q, c). After the
    candidates are re-scored exactly, a true neighbour among them ranks in the top k: this is recall@k."""
    hits = 0
    step = max(1, (1 << 24) // (truth.shape[1] * found.shape[1]))  # queries at a time: (step, k, c) booleans
    for s in range(0, len(truth), step):
        hits += int((truth[s : s + step, :, None] == found[s : s + step, None, :]).any(axis=2).sum())
    return hits / truth.size


def _aim(target: float, queries: int, k: int) -> float:
    """The recall to tune for: ``target`` plus three (binomial) standard errors of a recall measured on
    ``queries`` × k neighbours, so that the whole file, not just the sample, meets the target."""
    return min(1.0, target + 3 * math.sqrt(target * (1 - target) / max(1, queries * k)))


def _tune(measure, start: int, ceiling: int, target: float) -> tuple[int, float]:
    """The smallest value in [start, ceiling] (to within 1/8) whose measure meets ``target``: doubling,
    then halving the gap; the ceiling and its measure when none does. Recall grows with the value."""
    value, failed = start, None
    recall = measure(value)
    while recall < target and value < ceiling:
        failed, value = value, min(2 * value, ceiling)
        recall = measure(value)
    if recall < target or failed is None:
        return value, recall
    while value - failed > max(1, value // 8):
        middle = (value + failed) // 2
        got = measure(middle)
        if got >= target:
            value, recall = middle, got
        else:
            failed = middle
    return value, recall


# ---- building ------------------------------------------------------------------------------------

def build_index(path: str, output: str, kind: str = "auto", max_memory: int | None = None, k: int = 10,
                target_recall: float = 0.95, sample: int = 1000, seed: int = 0, overwrite: bool = False,
                block: int = READ_BLOCK, progress=None) -> IndexReport:
    """Build an index of ``path``'s pooled vectors at ``output`` (and its sidecar ``output.json``),
    tuned so that recall@k on ``sample`` of the file's own rows reaches ``target_recall`` where the
    search parameter allows. ``progress``: called with a short line at each stage (or None)."""
    began = time.monotonic()
    path, output = os.fspath(path), os.fspath(output)
    say = progress or (lambda line: None)
    if k < 1:
        raise UsageError("-k must be at least 1")
    if not 0 < target_recall <= 1:
        raise UsageError(f"the target recall {target_recall} is not in (0, 1]")
    if sample < 1:
        raise UsageError("the sample of queries must hold at least 1 row")
    _check_index_output(path, output, overwrite)
    faiss = _faiss()
    with TokenFile(path) as f:
        n, dataset = len(f), f.vectors_dataset()
        if not n:
            raise VitExtractError(f"{path} has no rows to index")
        dim = int(f.h5[dataset].shape[1])
        plan = choose(kind, n, dim, max_memory)
        say(f"building the {plan.kind} index of {n:,} × {dim} ({dataset})")
        rng = np.random.default_rng(seed)
        if plan.kind in ("ivf", "ivfpq"):
            built = _build_ivf(faiss, f, dataset, plan, n, dim, k, target_recall, sample, rng, block, say)
        else:
            built = _build_flat_or_hnsw(faiss, f, dataset, plan, n, dim, k, target_recall, sample, rng, block, say)
        index, rows, excluded, recall, queries = built
        keys = [f.shown_key(int(r)) for r in rows]
        identity = {"run_id": str(f.h5.attrs.get("run_id", "")), "committed": n}
    report = IndexReport(
        kind=plan.kind, reason=plan.reason, rows=len(rows), excluded=excluded, dim=dim, dataset=dataset,
        params=plan.params, index_bytes=0, recall=recall, k=min(k, len(rows)), target_recall=target_recall,
        queries=queries,
        build_seconds=0.0, source=os.path.abspath(path), output=output, sidecar=sidecar_path(output))
    _save(faiss, index, report, identity, rows, keys)
    report.build_seconds = round(time.monotonic() - began, 3)
    return report


def _rows(count: int) -> str:
    return f"{count:,} row{'s' * (count != 1)}"


def _same_path(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _check_index_output(path: str, output: str, overwrite: bool) -> None:
    if read_as_output(output, [path]) is not None:
        raise UsageError(f"the index output {output} is the file to index itself; give another name such as "
                         f"{index_beside(path)}")
    if read_as_output(sidecar_path(output), [path]) is not None:
        raise UsageError(f"the index's sidecar {sidecar_path(output)} would be the file to index itself; give "
                         f"another -o such as {index_beside(path)}")
    check_output(output, resume=False, overwrite=overwrite, can_resume=False)
    check_output(sidecar_path(output), resume=False, overwrite=overwrite, can_resume=False)


def _draw(rng, n: int, count: int) -> np.ndarray:
    return np.sort(rng.choice(n, size=min(n, count), replace=False)).astype(np.int64)


def _build_flat_or_hnsw(faiss, f, dataset, plan, n, dim, k, target, sample, rng, block, say):
    """One pass: add every finite row; the sample's truth comes from the exact vectors the index keeps."""
    if plan.kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    else:
        inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        plan.params.update(M=HNSW_M, efConstruction=HNSW_EF_CONSTRUCTION)
    index = faiss.IndexIDMap(inner)  # ids: the file's row numbers (left-out rows leave gaps)
    all_rows, excluded = [], 0
    for rows, vectors, bad in _blocks(f, dataset, block):
        index.add_with_ids(vectors, rows)
        all_rows.append(rows)
        excluded += bad
    rows = np.concatenate(all_rows)
    if not len(rows):
        raise VitExtractError(f"{f.path} has no finite rows to index (all {n:,} are inf or NaN)")
    if plan.kind == "flat":
        return index, rows, excluded, 1.0, 0  # exact: nothing to measure
    kk = min(k, len(rows))
    # Queries and truth from the very vectors the graph links (exact search over them; positions → rows).
    storage = faiss.downcast_index(inner.storage)
    queries = storage.reconstruct_batch(_draw(rng, len(rows), sample))  # (Q, D), normalised
    best, _ = storage.search(queries, kk)
    kth = best[:, -1]  # each query's k-th best exact score
    say(f"tuning efSearch for recall@{kk} ≥ {target} on {_rows(len(queries))} of the file")

    def measure(ef: int) -> float:
        inner.hnsw.efSearch = ef
        return _recall_by_score(index.search(queries, kk)[0], kth, kk)  # the graph's scores are exact

    ceiling = max(kk, 16, min(EF_SEARCH_MAX, len(rows)))
    ef, recall = _tune(measure, max(kk, 16), ceiling, _aim(target, len(queries), kk))
    inner.hnsw.efSearch = ef
    plan.params.update(efSearch=ef, rerank=1)
    return index, rows, excluded, recall, len(queries)


def _build_ivf(faiss, f, dataset, plan, n, dim, k, target, sample, rng, block, say):
    """Two passes: a random sample (training rows, queries), then every finite row added while the
    queries' exact top-k is kept."""
    nlist = _nlist(n)
    train_count = min(n, TRAIN_MAX_ROWS, TRAIN_MAX_BYTES // (4 * dim))
    say(f"reading {train_count:,} rows to train {nlist} lists")
    drawn = _draw(rng, n, max(train_count, sample))
    pool_rows, pool = _gather(f, dataset, drawn, block)
    if not len(pool_rows):
        raise VitExtractError(f"{f.path} has no finite rows among the {len(drawn):,} drawn to train on (inf or NaN)")
    nlist = max(1, min(nlist, len(pool_rows)))
    order = rng.permutation(len(pool_rows))
    train, queries = pool[order[:train_count]], pool[np.sort(order[:sample])]
    quantizer = faiss.IndexFlatIP(dim)
    if plan.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        if len(train) < 2:  # k-means needs a row per centroid, and a code of one bit has two
            raise VitExtractError(f"{f.path} has {len(train)} finite row to train an ivfpq index on; it needs at "
                                  "least 2 (use --kind flat: exact, and as small at this size)")
        nbits = min(PQ_NBITS, max(1, int(math.log2(len(train)))))  # k-means needs a row per centroid
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, plan.params["m"], nbits, faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.min_points_per_centroid = 1  # a small file trains on what it has, without warnings
        plan.params["nbits"] = nbits
    index.cp.min_points_per_centroid = 1
    index.train(train)
    del train, pool
    say(f"adding {n:,} rows")
    truth = _ExactTopK(queries, min(k, n))
    all_rows, excluded = [], 0
    for rows, vectors, bad in _blocks(f, dataset, block):
        index.add_with_ids(vectors, rows)  # an IVF keeps ids itself
        truth.add(rows, vectors)
        all_rows.append(rows)
        excluded += bad
    rows = np.concatenate(all_rows)
    kk = min(k, len(rows))
    plan.params["nlist"] = nlist
    say(f"tuning nprobe for recall@{kk} ≥ {target} on {_rows(len(queries))} of the file")

    def measure_with(factor: int):
        def measure(nprobe: int) -> float:
            index.nprobe = nprobe
            scores, found = index.search(queries, min(factor * kk, len(rows)))
            if plan.kind == "ivf":  # exact scores of the stored vectors: ties count (see _recall_by_score)
                return _recall_by_score(scores, truth.scores.min(axis=1), kk)
            return _recall(found, truth.rows)  # PQ scores are approximate: the true rows themselves
        return measure

    # ivf scores exactly: k candidates. ivfpq: more candidates (re-scored from the file) may spare
    # scanning lists: the first factor that meets the aim probing at most half of them, else the one
    # that meets it probing fewest (stopping once a larger factor spares none), else the largest.
    aim, met = _aim(target, len(queries), kk), []
    for factor in ((1,) if plan.kind == "ivf" else RERANK_FACTORS):
        nprobe, recall = _tune(measure_with(factor), 1, nlist, aim)
        if recall >= aim:
            met.append((nprobe, factor, recall))
            if nprobe <= max(1, nlist // 2) or (len(met) > 1 and nprobe >= met[-2][0]):
                break  # few lists scanned, or more candidates no longer spare any
    nprobe, factor, recall = min(met) if met else (nprobe, factor, recall)
    index.nprobe = nprobe
    plan.params.update(nprobe=nprobe, rerank=factor)
    return index, rows, excluded, recall, len(queries)


def _save(faiss, index, report: IndexReport, identity: dict, rows: np.ndarray, keys: list[str]) -> None:
    """Index and sidecar under temporary names, then renamed into place: a killed build leaves no
    half index under the final names (the old sidecar goes first, so no sidecar ever names a new index)."""
    output, sidecar = output_target(report.output), output_target(report.sidecar)  # through a link: its target
    temporary = [f"{output}.tmp{os.getpid()}", f"{sidecar}.tmp{os.getpid()}"]
    try:
        faiss.write_index(index, temporary[0])
        _fsync(temporary[0])
        report.index_bytes = os.path.getsize(temporary[0])
        record = {"format": FORMAT, "format_version": FORMAT_VERSION, "vit_extract_version": __version__,
                  "source": report.source, **identity, "dataset": report.dataset, "dim": report.dim,
                  "metric": "cosine", "kind": report.kind, "params": report.params, "recall": report.recall,
                  "k": report.k, "target_recall": report.target_recall, "queries": report.queries,
                  "excluded": report.excluded, "index_bytes": report.index_bytes,
                  "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "rows": rows.tolist(), "keys": keys}  # row → key: rows ascending, keys aligned
        with open(temporary[1], "w", encoding="utf-8") as handle:
            json.dump(record, handle, ensure_ascii=False)
            handle.flush()
            os.fsync(handle.fileno())
        if os.path.exists(sidecar):
            os.remove(sidecar)
        os.replace(temporary[0], output)
        os.replace(temporary[1], sidecar)
    except (OSError, RuntimeError) as error:  # faiss reports a failed write as RuntimeError
        message = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
        raise VitExtractError(f"cannot write {output}: {message}") from None
    finally:
        for name in temporary:
            if os.path.exists(name):
                os.remove(name)


def _fsync(name: str) -> None:
    with open(name, "rb+") as handle:
        os.fsync(handle.fileno())


# ---- searching -----------------------------------------------------------------------------------

class LoadedIndex:
    """An index opened for the very file it was built from; searches return exact cosine scores."""

    def __init__(self, path: str, record: dict, index):
        self.path, self.record, self.index = path, record, index
        self.kind, self.params, self.dataset = record["kind"], record["params"], record["dataset"]
        self.rows = np.asarray(record["rows"], dtype=np.int64)  # ascending
        self.keys = record["keys"]
        self.factor = int(self.params.get("rerank", 1))

    def key(self, row: int) -> str:
        """The key of an indexed row, as `similar` shows it (recorded at build time)."""
        return self.keys[int(np.searchsorted(self.rows, row))]

    def describe(self) -> str:
        """One line for the CLI: which index, its tuned parameter and its measured recall."""
        tuned = ", ".join(f"{name} {self.params[name]}" for name in ("nprobe", "efSearch") if name in self.params)
        recall = "exact" if self.kind == "flat" else f"recall@{self.record['k']} {self.record['recall']:.3f} at build"
        return f"{self.kind} index {self.path} ({', '.join(filter(None, [tuned, recall]))})"

    def search(self, f: TokenFile, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """For each query (Q, D): up to k (row, cosine) pairs, best first, ties by lower row, as
        top_k_cosine ranks them: the index proposes candidates, the file's vectors score them."""
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.index.d)
        q = np.ascontiguousarray(q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12))
        wanted = min(self.factor * k, self.index.ntotal)
        if self.kind == "hnsw":  # efSearch is the candidate list: never below what is asked for
            inner = _faiss().downcast_index(self.index.index)
            inner.hnsw.efSearch = max(int(self.params["efSearch"]), wanted)
        _, labels = self.index.search(q, wanted)  # (Q, wanted); -1 where fewer were found
        candidates = np.unique(labels[labels >= 0])
        vectors = _read_rows(f, self.dataset, candidates)  # (c, D), as stored
        results = []
        for query, found in zip(q, labels):
            at = np.searchsorted(candidates, np.unique(found[found >= 0]))
            ranked = top_k_cosine([vectors[at]], query, k)  # positions ascending = rows ascending
            results.append([(int(candidates[at[i]]), score) for i, score in ranked])
        return results


def _read_rows(f: TokenFile, dataset: str, rows: np.ndarray) -> np.ndarray:
    """Rows (ascending, unique) of an (N, D) dataset as stored (bfloat16 too, through the reader):
    one slice when they are dense, else row by row (a few times k rows: HDF5 caches their chunks)."""
    data = f.array(dataset)
    if not len(rows):
        return np.empty((0, f.h5[dataset].shape[1]), dtype=np.float32)
    first, last = int(rows[0]), int(rows[-1]) + 1
    if len(rows) * 8 >= last - first:
        return data[first:last][rows - first]
    return np.stack([data[int(r)] for r in rows])


def load_index(index_path: str, f: TokenFile) -> LoadedIndex:
    """The index at ``index_path`` if it was built from ``f`` as it is now; IndexMismatch if the
    file changed since (another run_id or row count); VitExtractError if it cannot be read."""
    index_path = os.fspath(index_path)
    sidecar = sidecar_path(index_path)
    if not os.path.isfile(index_path):
        raise UsageError(f"the index {index_path} does not exist")
    try:
        with open_regular(sidecar) as handle:  # (a named pipe there would be waited on for ever)
            record = json.load(handle)
    except FileNotFoundError:
        raise VitExtractError(f"{index_path} has no sidecar {sidecar}; build it again with vit-extract index") from None
    except (OSError, ValueError) as error:
        raise VitExtractError(f"cannot read {sidecar}: {error}") from None
    if record.get("format") != FORMAT or record.get("format_version") != FORMAT_VERSION:
        raise VitExtractError(f"{sidecar} is not a vit-extract index sidecar of format {FORMAT_VERSION}; build it again")
    now = {"run_id": str(f.h5.attrs.get("run_id", "")), "committed": len(f)}
    # The same run's rows, however the file is named now (moved or copied with its index): the same data.
    if (record["run_id"], record["committed"]) != (now["run_id"], now["committed"]):
        if not _same_path(record.get("source", ""), f.path):
            raise IndexMismatch(f"{index_path} is the index of another file ({record.get('source')}), not of {f.path}; "
                                f"index this one with vit-extract index {shlex.quote(f.path)} -o NEW.faiss")
        run = "the same run" if record["run_id"] == now["run_id"] else f"run {now['run_id'][:8]}, not {record['run_id'][:8]}"
        raise IndexMismatch(
            f"{index_path} was built from {record['committed']:,} rows of {f.path}, which has changed since "
            f"({now['committed']:,} rows, {run}): build the index again "
            f"(vit-extract index {shlex.quote(f.path)} -o {shlex.quote(index_path)} --overwrite)")
    if record["dataset"] != f.vectors_dataset() or record["dim"] != f.h5[record["dataset"]].shape[1]:
        raise IndexMismatch(f"{index_path} indexes {record['dataset']} of width {record['dim']}, "
                            f"which {f.path} does not hold; build the index again")
    if os.path.getsize(index_path) != record["index_bytes"]:
        raise IndexMismatch(f"{index_path} is not the index its sidecar describes (another size); build it again")
    faiss = _faiss()
    try:
        index = faiss.read_index(index_path)
    except RuntimeError as error:
        raise VitExtractError(f"cannot read the index {index_path}: {str(error).splitlines()[0]}") from None
    if index.ntotal != len(record["rows"]):
        raise IndexMismatch(f"{index_path} holds {index.ntotal:,} vectors, its sidecar names {len(record['rows']):,}; "
                            "build it again")
    if "nprobe" in record["params"]:
        faiss.extract_index_ivf(index).nprobe = int(record["params"]["nprobe"])
    return LoadedIndex(index_path, record, index)
