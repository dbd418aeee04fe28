"""Vector indexes (consumers/index.py) and `similar` through them: recall, exact scores, identity."""

import json
import os
import shutil
import sys
import uuid

import h5py
import numpy as np
import pytest

import vitcore
from tests.helpers import TINY
from vitcore.consumers.index import IndexMismatch, build_index, choose, index_beside, load_index, sidecar_path
from vitcore.consumers.search import similar
from vitcore.consumers.tokens import TokenFile
from vitcore.errors import OutputExistsError, UsageError, VitExtractError
from vitcore.run.pipeline import ExtractOptions
from vitcore.run.shard import shard_path
from vitcore.store.merge import merge
from vitcore.system.units import parse_size

pytest.importorskip("faiss")

EXACT = ExtractOptions(model=TINY, out_dtype="float32", dtype="float32", device="cpu", workers=0, batch_size=3)
APPROXIMATE = ("hnsw", "ivf", "ivfpq")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A real tiny pooled run over two pictures: the attributes and layout the synthetic files reuse."""
    folder = tmp_path_factory.mktemp("base")
    images = folder / "imgs"
    images.mkdir()
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = folder / "base.h5"
    vitcore.extract([images], out, EXACT, pool="mean")
    return str(out)


def with_vectors(base: str, out, vectors: np.ndarray, keys=None, run_id=None) -> str:
    """A copy of ``base`` whose pooled rows are ``vectors`` (N, D), keyed img00000.png…, with a
    run_id of its own (as a new run has)."""
    shutil.copy(base, out)
    n, d = vectors.shape
    keys = keys or [f"img{i:05d}.png" for i in range(n)]
    with h5py.File(out, "r+") as h5:
        for name in ("tokens", "paths", "root_index", "image_size"):
            del h5[name]
        h5.create_dataset("tokens", data=vectors.astype(np.float32), maxshape=(None, d), chunks=(128, d))
        h5.create_dataset("paths", data=np.array(keys, dtype=object), dtype=h5py.string_dtype(), maxshape=(None,))
        h5.create_dataset("root_index", data=np.zeros(n, np.int32), maxshape=(None,))
        h5.create_dataset("image_size", data=np.ones((n, 2), np.int32), maxshape=(None, 2))
        h5.attrs["committed"] = n
        h5.attrs["run_id"] = run_id or uuid.uuid4().hex
    return str(out)


def random_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def exact_top(vectors: np.ndarray, k: int) -> np.ndarray:
    """Each row's exact top-k rows by cosine (N, k), computed here with numpy alone."""
    x = vectors.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.argsort(-(x @ x.T), axis=1, kind="stable")[:, :k]


def searched_rows(out: str, index: str, queries: np.ndarray, k: int) -> np.ndarray:
    with TokenFile(out) as f:
        found = load_index(index, f).search(f, queries, k)
    return np.array([[row for row, _ in hits] for hits in found])


@pytest.mark.parametrize("kind", ["flat", *APPROXIMATE])
def test_every_row_finds_itself_first(base, tmp_path, kind):
    vectors = random_vectors(400, 32, seed=1)
    out = with_vectors(base, tmp_path / "v.h5", vectors)
    report = build_index(out, tmp_path / "v.faiss", kind=kind)
    assert report.kind == kind and report.rows == 400 and report.excluded == 0
    rows = searched_rows(out, str(tmp_path / "v.faiss"), vectors, 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(400))
    # The same through `similar`, by key: the row itself, score 1.
    hits, kind_read = similar(out, "img00123.png", k=3, index=str(tmp_path / "v.faiss"))
    assert kind_read == "key" and hits[0].key == "img00123.png" and hits[0].row == 123
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kind", APPROXIMATE)
def test_tuned_recall_at_10_reaches_the_target_on_random_vectors(base, tmp_path, kind):
    """3000 × 64 Gaussian vectors (no structure to exploit: the hard case); recall@10 against exact
    neighbours computed here, over every row as a query, not only the build's sample."""
    vectors = random_vectors(3000, 64)
    out = with_vectors(base, tmp_path / "r.h5", vectors)
    report = build_index(out, tmp_path / "r.faiss", kind=kind, k=10, target_recall=0.95)
    assert report.kind == kind and report.recall >= 0.95 and report.queries == 1000
    assert {"hnsw": "efSearch", "ivf": "nprobe", "ivfpq": "nprobe"}[kind] in report.params
    truth = exact_top(vectors, 10)
    found = searched_rows(out, str(tmp_path / "r.faiss"), vectors, 10)
    recall = np.mean([np.isin(t, f).mean() for t, f in zip(truth, found)])
    assert recall >= 0.95, (kind, report.params, recall)
    # The tuned parameter travels with the index: the sidecar has it, and a reload applies it.
    record = json.loads(open(sidecar_path(str(tmp_path / "r.faiss"))).read())
    assert record["params"] == report.params and record["metric"] == "cosine" and record["kind"] == kind


def test_similar_with_a_flat_index_equals_exact_search(base, tmp_path):
    vectors = random_vectors(500, 24, seed=2)
    vectors[10] = vectors[11]  # a tie: the lower row first either way
    out = with_vectors(base, tmp_path / "s.h5", vectors)
    report = build_index(out, index_beside(out))  # auto: 500 rows → flat, found beside the file
    assert report.kind == "flat" and "exact search" in report.reason and report.recall == 1.0
    for query in ("img00011.png", "img00000.png", "img00499.png", "img00250.png"):
        exact = similar(out, query, k=20, index=False)
        through = similar(out, query, k=20)
        assert exact.searched.method == "exact" and exact.searched.describe() == "searched exactly"
        assert through.searched.method == "index" and through.searched.index == index_beside(out)
        assert "flat index" in through.searched.describe()
        assert [h.key for h in through.hits] == [h.key for h in exact.hits]
        assert [h.row for h in through.hits] == [h.row for h in exact.hits]
        np.testing.assert_allclose([h.score for h in through.hits], [h.score for h in exact.hits], atol=1e-5)
    hits, _ = similar(out, "img00011.png", k=2)
    assert [h.row for h in hits] == [10, 11]


@pytest.mark.parametrize("stored", [{}, {"out_dtype": "bfloat16", "compression": "gzip"}])
def test_similar_on_a_real_unpooled_run_through_its_index(tmp_path, photos, stored):
    """The mean vectors of a real run (float32, or bfloat16 and compressed), a key and a new image
    file as queries."""
    out = tmp_path / "t.h5"
    vitcore.extract([photos], out, EXACT, **stored)
    report = build_index(str(out), tmp_path / "t.faiss", kind="hnsw")
    assert report.dataset == "mean" and report.kind == "hnsw"
    for query in ("chelsea.jpg", str(photos / "rocket.jpg")):
        exact, kind = similar(str(out), query, k=5, index=False)
        found = similar(str(out), query, k=5)
        assert found.searched.method == "index" and found.kind == kind
        assert [h.key for h in found.hits] == [h.key for h in exact]
        np.testing.assert_allclose([h.score for h in found.hits], [h.score for h in exact], atol=1e-5)


def test_an_index_of_a_changed_file_is_refused_when_given_and_passed_over_when_beside(base, tmp_path):
    vectors = random_vectors(200, 16, seed=3)
    out = with_vectors(base, tmp_path / "c.h5", vectors)
    index = index_beside(out)
    build_index(out, index, kind="hnsw")
    assert similar(out, "img00001.png", k=3).searched.method == "index"
    with TokenFile(out) as f:
        run_id = str(f.h5.attrs["run_id"])
    changed = [
        ("rewritten", lambda: with_vectors(base, out, vectors)),  # same rows, a new run
        ("extended", lambda: with_vectors(base, out, random_vectors(210, 16, seed=3), run_id=run_id)),  # resumed: more rows
    ]
    for what, change in changed:
        change()
        with pytest.raises(IndexMismatch, match="changed since") as refused:
            similar(out, "img00001.png", k=3, index=index)
        assert "\n" not in str(refused.value), what
        found = similar(out, "img00001.png", k=3)  # beside it: not used, and said so
        assert found.searched.method == "exact" and "not used" in found.searched.note, what
        assert "not used" in found.searched.describe() and found.hits[0].row == 1
    build_index(out, index, overwrite=True)
    assert similar(out, "img00001.png", k=3).searched.method == "index"


@pytest.mark.parametrize("virtual", [False, True])
def test_a_merged_file_indexes_with_its_own_keys(tmp_path, virtual):
    from PIL import Image

    images = tmp_path / "imgs"
    for sub in ("a", "b"):
        (images / sub).mkdir(parents=True)
    rng = np.random.default_rng(4)
    for i in range(9):
        picture = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
        Image.fromarray(picture).save(images / ("a" if i % 2 else "b") / f"{i:02d}.png")
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(images / "b" / "01.png")  # a key under two roots
    out = tmp_path / "m.h5"
    shards = [shard_path(str(out), i, 2) for i in range(2)]
    for i, shard in enumerate(shards):
        vitcore.extract([images / "a", images / "b"], shard, EXACT, shard=(i, 2), pool="mean")
    merge(str(out), shards, virtual=virtual)
    report = build_index(str(out), tmp_path / "m.faiss", kind="hnsw")
    record = json.loads(open(report.sidecar).read())
    with TokenFile(out) as f:
        shown = [f.shown_key(r) for r in range(len(f))]
        assert record["run_id"] == str(f.h5.attrs["run_id"]) and record["committed"] == len(f) == 10
    assert record["rows"] == list(range(10)) and record["keys"] == shown
    assert sum(key.endswith("01.png") and os.path.isabs(key) for key in shown) == 2  # qualified by its root
    query = next(key for key in shown if not os.path.isabs(key))
    hits = similar(str(out), query, k=10, index=report.output)[0]
    assert hits[0].key == query and sorted(h.key for h in hits) == sorted(shown)


def test_existing_output_refused_without_overwrite(base, tmp_path):
    out = with_vectors(base, tmp_path / "e.h5", random_vectors(50, 8))
    index = tmp_path / "e.faiss"
    build_index(out, index)
    before = index.read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        build_index(out, index, kind="ivf")
    assert index.read_bytes() == before
    os.remove(index)  # a sidecar alone is not overwritten silently either
    with pytest.raises(OutputExistsError, match=r"\.json already exists"):
        build_index(out, index)
    assert build_index(out, index, kind="ivf", overwrite=True).kind == "ivf"
    assert sorted(os.listdir(tmp_path)) == ["e.faiss", "e.faiss.json", "e.h5"]  # no temporary files left
    with pytest.raises(UsageError, match="file to index itself"):
        build_index(out, out, overwrite=True)
    # a named pipe as the sidecar: never written (even with --overwrite), never waited on when read
    os.replace(tmp_path / "e.faiss.json", tmp_path / "kept.json")
    os.mkfifo(tmp_path / "e.faiss.json")
    with pytest.raises(UsageError, match="is a named pipe, not a regular file"):
        build_index(out, index, overwrite=True)
    with TokenFile(str(out)) as f, pytest.raises(VitExtractError, match="e.faiss.json: not a regular file but a named pipe"):
        load_index(str(index), f)


def test_a_failed_write_leaves_the_old_index_whole_and_no_temporary_files(base, tmp_path, monkeypatch):
    import faiss

    out = with_vectors(base, tmp_path / "w.h5", random_vectors(60, 8))
    index = tmp_path / "w.faiss"
    build_index(out, index)
    before = (index.read_bytes(), open(sidecar_path(str(index))).read())

    def half_written(built, name):
        open(name, "wb").write(b"half an index")
        raise RuntimeError("Error in faiss::FileIOWriter: disk full")

    monkeypatch.setattr(faiss, "write_index", half_written)
    with pytest.raises(VitExtractError, match="cannot write .*disk full"):
        build_index(out, index, kind="hnsw", overwrite=True)
    assert (index.read_bytes(), open(sidecar_path(str(index))).read()) == before
    assert sorted(os.listdir(tmp_path)) == ["w.faiss", "w.faiss.json", "w.h5"]
    assert similar(out, "img00002.png", k=1).hits[0].row == 2


def test_non_finite_rows_are_left_out_and_empty_files_refused(base, tmp_path):
    vectors = random_vectors(120, 16, seed=5)
    vectors[3, 2], vectors[7], vectors[8, 0] = np.nan, np.inf, -np.inf
    out = with_vectors(base, tmp_path / "n.h5", vectors)
    for kind in ("flat", "hnsw", "ivf", "ivfpq"):
        index = tmp_path / f"n.{kind}.faiss"
        report = build_index(out, index, kind=kind)
        assert report.rows == 117 and report.excluded == 3
        record = json.loads(open(sidecar_path(str(index))).read())
        assert not {3, 7, 8} & set(record["rows"]) and "img00007.png" not in record["keys"]
        with TokenFile(out) as f:
            assert load_index(str(index), f).index.ntotal == 117
        hits = similar(out, "img00000.png", k=120, index=str(index))[0]
        assert len(hits) <= 117 and not {3, 7, 8} & {h.row for h in hits}
        assert all(np.isfinite(h.score) for h in hits)
    empty = with_vectors(base, tmp_path / "z.h5", np.zeros((0, 16), np.float32))
    with pytest.raises(VitExtractError, match="no rows to index"):
        build_index(empty, tmp_path / "z.faiss")
    broken = with_vectors(base, tmp_path / "b.h5", np.full((5, 16), np.nan, np.float32))
    with pytest.raises(VitExtractError, match="no finite rows"):
        build_index(broken, tmp_path / "b.faiss")
    assert not os.path.exists(tmp_path / "b.faiss")


def test_auto_chooses_by_rows_and_budget():
    assert choose("auto", 50_000, 1024, None).kind == "flat"
    assert choose("auto", 50_000, 1024, parse_size("1GiB")).kind == "flat"
    assert choose("auto", 2_000_000, 1024, None).kind == "hnsw"
    assert choose("auto", 2_000_000, 1024, parse_size("9GB")).kind == "hnsw"
    assert choose("auto", 2_000_000, 1024, parse_size("8.5GB")).kind == "ivf"  # vectors fit, the graph not
    plan = choose("auto", 2_000_000, 1024, parse_size("512MiB"))
    assert plan.kind == "ivfpq" and plan.params["m"] == 128 and "128-byte PQ codes" in plan.reason
    assert choose("auto", 50_000, 1024, parse_size("100MB")).kind == "ivfpq"  # small, but over the budget
    with pytest.raises(UsageError, match="too small"):
        choose("auto", 2_000_000, 1024, parse_size("1MB"))
    with pytest.raises(UsageError, match="over the budget"):
        choose("hnsw", 2_000_000, 1024, parse_size("1GB"))
    with pytest.raises(UsageError, match="unknown index kind"):
        choose("lsh", 10, 8, None)


def test_an_auto_index_under_a_budget_fits_it(base, tmp_path):
    vectors = random_vectors(3000, 64, seed=6)
    out = with_vectors(base, tmp_path / "b.h5", vectors)
    report = build_index(out, tmp_path / "b.faiss", max_memory=parse_size("400KB"))
    assert report.kind == "ivfpq" and report.index_bytes <= 400_000 and report.recall >= 0.95


def test_sizes_parse():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5G") == int(1.5 * 2**30) and parse_size("1000") == 1000 and parse_size(" 64 kib ") == 65536
    for bad in ("", "GB", "2 XB", "-1GB", "0"):
        with pytest.raises(UsageError):
            parse_size(bad)


def test_without_faiss_one_line_names_the_extra(base, tmp_path, monkeypatch):
    out = with_vectors(base, tmp_path / "f.h5", random_vectors(40, 8))
    build_index(out, index_beside(out))
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss → ImportError
    with pytest.raises(VitExtractError, match=r"pip install 'vit-extract\[index\]'"):
        build_index(out, tmp_path / "other.faiss")
    with pytest.raises(VitExtractError, match=r"vit-extract\[index\]"):
        similar(out, "img00001.png", k=2, index=index_beside(out))
    found = similar(out, "img00001.png", k=2)  # the index beside it cannot be read: exact, with a note
    assert found.searched.method == "exact" and "vit-extract[index]" in found.searched.note
    assert found.hits[0].row == 1


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_duplicates_tie_and_count_as_found_in_the_measured_recall(base, tmp_path, kind):
    """A corpus of 40 pictures each stored 25 times (one vector, 25 rows): whichever copies the
    index returns are true neighbours, so the measured recall is the real one, not 10/25 of it."""
    vectors = np.repeat(random_vectors(40, 32, seed=3), 25, axis=0)  # (1000, 32)
    out = with_vectors(base, tmp_path / "dup.h5", vectors)
    report = build_index(out, str(tmp_path / "dup.faiss"), kind=kind)
    assert report.recall >= 0.95, report
    found = searched_rows(out, str(tmp_path / "dup.faiss"), vectors[::25], 10)
    for picture, rows in enumerate(found):  # every hit is a copy of the query picture
        assert set(rows // 25) == {picture}, rows


def test_ivfpq_on_a_single_finite_row_is_refused_in_one_line(base, tmp_path):
    vectors = random_vectors(5, 16)
    vectors[1:] = np.nan  # one row left to train on
    out = with_vectors(base, tmp_path / "one.h5", vectors)
    with pytest.raises(VitExtractError, match="--kind flat") as refused:
        build_index(out, str(tmp_path / "one.faiss"), kind="ivfpq")
    assert "\n" not in str(refused.value) and not (tmp_path / "one.faiss").exists()
    assert build_index(out, str(tmp_path / "flat.faiss"), kind="flat").rows == 1


def test_the_index_of_another_file_is_named_as_such_and_never_to_be_overwritten(base, tmp_path):
    mine = with_vectors(base, tmp_path / "mine.h5", random_vectors(20, 16, seed=1))
    theirs = with_vectors(base, tmp_path / "theirs.h5", random_vectors(20, 16, seed=2))
    build_index(theirs, str(tmp_path / "theirs.faiss"))
    with pytest.raises(IndexMismatch, match="another file") as refused:
        similar(mine, "img00000.png", 3, index=str(tmp_path / "theirs.faiss"))
    assert "--overwrite" not in str(refused.value) and "theirs.h5" in str(refused.value)


def test_similar_leaves_non_finite_rows_out_with_or_without_an_index(base, tmp_path, cli):
    vectors = random_vectors(12, 16, seed=4)
    vectors[3] = np.nan
    vectors[7, 0] = np.inf
    out = with_vectors(base, tmp_path / "nan.h5", vectors)
    exact, _ = similar(out, "img00000.png", 12, index=False)
    assert len(exact) == 10 and {h.row for h in exact}.isdisjoint({3, 7})
    assert all(-1.0 <= h.score <= 1.0 for h in exact) and exact[0].score == 1.0
    build_index(out, str(tmp_path / "nan.faiss"))
    indexed, _ = similar(out, "img00000.png", 12, index=str(tmp_path / "nan.faiss"))
    assert [h.row for h in indexed] == [h.row for h in exact]
    shown = cli("similar", out, "img00000.png", "-k", "12", "--json", "--index", tmp_path / "nan.faiss")
    assert shown.exit_code == 0 and "Infinity" not in shown.stdout and "NaN" not in shown.stdout
    assert len(json.loads(shown.stdout)) == 10


def test_a_file_moved_with_its_index_still_uses_it(base, tmp_path):
    vectors = random_vectors(300, 16, seed=5)
    out = with_vectors(base, tmp_path / "here.h5", vectors)
    build_index(out, index_beside(out), kind="hnsw")
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("here.h5", "here.faiss", "here.faiss.json"):  # as rsync or cp -r carries them
        shutil.copy(tmp_path / name, moved / name)
    found = similar(str(moved / "here.h5"), "img00007.png", k=5)
    assert found.searched.method == "index" and found.hits[0].row == 7
    found = similar(str(moved / "here.h5"), "img00007.png", k=5, index=str(moved / "here.faiss"))
    assert found.searched.method == "index"


def test_an_index_that_answers_short_gives_way_to_exact_search(base, tmp_path, monkeypatch):
    """HNSW on many identical vectors can return fewer than k: the hits are then searched exactly."""
    vectors = np.concatenate([np.repeat(random_vectors(1, 16, seed=6), 200, axis=0), random_vectors(100, 16, seed=7)])
    out = with_vectors(base, tmp_path / "same.h5", vectors)
    build_index(out, index_beside(out), kind="hnsw")
    from vitcore.consumers.index import LoadedIndex

    real = LoadedIndex.search
    monkeypatch.setattr(LoadedIndex, "search", lambda self, f, q, k: [hits[: k // 2] for hits in real(self, f, q, k)])
    found = similar(out, "img00000.png", k=150)
    assert len(found.hits) == 150 and found.searched.method == "exact"
    assert "gave 75 of the 150 hits asked for" in found.searched.note
    assert all(hit.score > 0.9999 and hit.row < 200 for hit in found.hits)  # 150 of the 200 copies of the query
