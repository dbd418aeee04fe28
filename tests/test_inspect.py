"""Looking at what was extracted: PCA token maps, sheets, nearest neighbours."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vitcore
from tests.helpers import TINY
from vitcore.errors import UsageError
from vitcore.run.pipeline import ExtractOptions
from vitcore.consumers.search import similar, top_k_cosine
from vitcore.consumers.visualize import CAPTION, GAP, THUMB, pca_maps, token_sheet

OPTS = ExtractOptions(model=TINY, dtype="float32", device="cpu", workers=0)


def _two_halves(rng, grid=(4, 6), dim=16):
    """Tokens on a grid whose left half is near vector a and right half near vector b."""
    rows, cols = grid
    a, b = rng.normal(size=dim) * 3, rng.normal(size=dim) * 3
    tokens = np.empty((rows, cols, dim))
    tokens[:, : cols // 2] = a
    tokens[:, cols // 2 :] = b
    return (tokens + rng.normal(scale=0.01, size=tokens.shape)).reshape(rows * cols, dim)


@pytest.mark.parametrize("joint", [False, True])
def test_pca_map_paints_the_two_halves_of_a_grid_in_two_colours(joint):
    rng = np.random.default_rng(0)
    tokens = _two_halves(rng)
    other = _two_halves(rng)
    colours = pca_maps([tokens, other], [(4, 6), (4, 6)], joint=joint)[0].astype(int)
    assert colours.shape == (4, 6, 3)
    left, right = colours[:, :3].reshape(-1, 3), colours[:, 3:].reshape(-1, 3)
    assert np.abs(left - left.mean(0)).max() < 40 and np.abs(right - right.mean(0)).max() < 40  # uniform halves
    assert np.linalg.norm(left.mean(0) - right.mean(0)) > 120  # clearly different colours


def test_pca_map_is_sign_stable_whatever_signs_the_svd_returns(monkeypatch):
    """A principal component's sign is arbitrary: an SVD may return -v for v (LAPACK builds do
    differ). The colours must not depend on it."""
    tokens = _two_halves(np.random.default_rng(1))
    first = pca_maps([tokens], [(4, 6)])[0]
    real_svd = np.linalg.svd
    calls = []

    def flipped_svd(a, *args, **kwargs):  # the same decomposition, every component's sign flipped
        u, s, vt = real_svd(a, *args, **kwargs)
        calls.append(vt.shape)
        return -u, s, -vt

    monkeypatch.setattr(np.linalg, "svd", flipped_svd)
    flipped = pca_maps([tokens], [(4, 6)])[0]
    assert calls  # the flipped decomposition was the one used
    np.testing.assert_array_equal(first, flipped)


def test_show_writes_a_png_sheet_of_the_expected_size(tmp_path, photos, cli):
    out = tmp_path / "t.h5"
    vitcore.extract([photos], out, OPTS)
    png = tmp_path / "sheet.png"
    result = cli("show", out, "coffee.jpg", "astronaut.jpg", "rocket.jpg", "-o", png, "--columns", "2")
    assert result.exit_code == 0, result.output
    with Image.open(png) as img:
        assert img.format == "PNG"
        cell_w = 2 * THUMB + GAP
        assert img.size == (GAP + 2 * (cell_w + GAP), GAP + 2 * (THUMB + CAPTION + GAP))
    # The sheet is written in the format its name says; a name that is no picture's is refused first.
    assert cli("show", out, "coffee.jpg", "-o", tmp_path / "s.jpg").exit_code == 0
    with Image.open(tmp_path / "s.jpg") as img:
        assert img.format == "JPEG"
    refused = cli("show", out, "coffee.jpg", "-o", tmp_path / "s.h5")
    assert refused.exit_code == 2 and "would be a picture: name it .png" in refused.stderr
    assert not (tmp_path / "s.h5").exists()
    image, chosen = token_sheet(str(out), first=3, joint=True, columns=3)
    assert chosen == ["alpha_cutout.png", "astronaut.jpg", "chelsea.jpg"]
    assert image.size == (GAP + 3 * (2 * THUMB + GAP + GAP), GAP + THUMB + CAPTION + GAP)


def test_show_refuses_pooled_files_and_unknown_keys(tmp_path, photos, cli):
    pooled = tmp_path / "p.h5"
    vitcore.extract([photos], pooled, OPTS, pool="mean")
    result = cli("show", pooled, "-o", tmp_path / "s.png")
    assert result.exit_code == 2 and "no patch tokens" in result.stderr and "--pool none" in result.stderr
    unpooled = tmp_path / "u.h5"
    vitcore.extract([photos], unpooled, OPTS)
    with pytest.raises(UsageError, match="not in"):
        token_sheet(str(unpooled), ["nope.jpg"])


def test_a_key_that_failed_is_named_as_failed_with_its_reason_not_as_missing(tmp_path, photos, cli, monkeypatch):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
    out = tmp_path / "t.h5"
    reason = dict(vitcore.extract([photos], out, OPTS).failures)["broken.jpg"]
    monkeypatch.chdir(tmp_path)  # so the query is taken as a key, not as the picture on disk
    qualified = str(photos.resolve() / "broken.jpg")  # ROOT/KEY, as info lists a failure's root
    for args in (("show", out, "broken.jpg", "-o", tmp_path / "s.png"), ("similar", out, "broken.jpg"),
                 ("show", out, qualified, "-o", tmp_path / "s.png")):
        result = cli(*args)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert f"{args[2]!r} failed when" in result.stderr and "so it has no row: " in result.stderr
        assert result.stderr.rstrip().endswith(f"so it has no row: {reason}") and " is not in " not in result.stderr
    both = cli("show", out, "broken.jpg", "nope.jpg", "-o", tmp_path / "s.png")
    assert both.exit_code == 2 and "broken.jpg, nope.jpg" in both.stderr and "1 of them failed" in both.stderr
    assert "'nope.jpg' is not in" in cli("show", out, "nope.jpg", "-o", tmp_path / "s.png").stderr


def test_a_key_is_found_whether_its_accents_are_typed_composed_or_decomposed(tmp_path, photos, cli, monkeypatch):
    import unicodedata

    # macOS names files decomposed (NFD: "e" + U+0301); a person types the composed "é" (NFC), and back.
    stored_nfd = unicodedata.normalize("NFD", "café.jpg")
    stored_nfc = "crème.jpg"
    shutil.copy(photos / "chelsea.jpg", photos / stored_nfd)
    shutil.copy(photos / "astronaut.jpg", photos / stored_nfc)
    (photos / unicodedata.normalize("NFD", "brisé.jpg")).write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
    latin1 = b"gar\xe7on.jpg"  # a name that is not UTF-8 (stored escaped): found by its bytes too
    shutil.copy(photos / "coffee.jpg", os.path.join(os.fsencode(photos), latin1))
    out = tmp_path / "t.h5"
    vitcore.extract([photos], out, OPTS)
    with vitcore.open_tokens(out) as f:
        assert latin1 in f and "gar\\xe7on.jpg" in f.keys
        np.testing.assert_array_equal(f[latin1], f["gar\\xe7on.jpg"])
        assert stored_nfd in f.keys and stored_nfc in f.keys  # stored as the file system spelled them
        for typed, stored in (("café.jpg", stored_nfd), (unicodedata.normalize("NFD", stored_nfc), stored_nfc)):
            assert typed != stored and typed in f
            np.testing.assert_array_equal(f[typed], f[stored])
        assert "cafe.jpg" not in f  # the same letters without the accent are another name
        root = f.roots[0]  # ROOT/KEY (the one way to name a key stored under two roots), typed composed
        np.testing.assert_array_equal(f[os.path.join(root, "café.jpg")], f[stored_nfd])
        assert f.failure_reason("brisé.jpg") is not None
    from vitcore.consumers.dataset import TokenDataset

    for keys in (latin1, [latin1, "café.jpg"]):  # one bytes key is one key, not its bytes as row numbers
        assert TokenDataset(out, keys=keys).keys[0] == "gar\\xe7on.jpg"
    monkeypatch.chdir(tmp_path)  # keys, not files on disk
    result = cli("similar", out, "café.jpg", "-k", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["key"] == stored_nfd
    assert cli("show", out, "café.jpg", "-o", tmp_path / "s.png").exit_code == 0
    failed = cli("show", out, "brisé.jpg", "-o", tmp_path / "s2.png")
    assert failed.exit_code == 2 and "failed when" in failed.stderr
    folder = cli("similar", out, photos)
    assert folder.exit_code == 2 and "is a folder: give a key" in folder.stderr


def test_blockwise_search_equals_brute_force():
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(1000, 24)).astype(np.float32)
    query = rng.normal(size=24)
    blocks = (vectors[i : i + 64] for i in range(0, 1000, 64))
    got = top_k_cosine(blocks, query, 15)
    scores = vectors @ query / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query))
    expected = np.argsort(-scores, kind="stable")[:15]
    assert [row for row, _ in got] == list(expected)
    np.testing.assert_allclose([s for _, s in got], scores[expected], rtol=1e-5)


def test_similar_finds_the_query_first_then_its_near_duplicate(tmp_path, photos, cli):
    with Image.open(photos / "chelsea.jpg") as img:  # a slightly resized copy
        img.resize((img.width - 9, img.height - 6), Image.Resampling.BICUBIC).save(photos / "zz_chelsea_copy.jpg", quality=92)
    out = tmp_path / "t.h5"
    vitcore.extract([photos], out, OPTS)
    hits, kind = similar(str(out), "chelsea.jpg", k=9)
    assert kind == "key" and hits[0].key == "chelsea.jpg" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[1].key == "zz_chelsea_copy.jpg" and hits[1].score > hits[2].score
    assert len(hits) == 9 and [h.rank for h in hits] == list(range(1, 10))
    result = cli("similar", out, "chelsea.jpg", "-k", "3", "--json")
    parsed = json.loads(result.stdout)
    assert [h["key"] for h in parsed] == ["chelsea.jpg", "zz_chelsea_copy.jpg", hits[2].key]
    # A new image file is encoded with the file's own settings.
    outside = tmp_path / "query.jpg"
    shutil.copy(photos / "rocket.jpg", outside)
    sheet = tmp_path / "hits.png"
    result = cli("similar", out, outside, "-k", "2", "--sheet", sheet)
    assert result.exit_code == 0 and "rocket.jpg" in result.stdout
    new_hits, kind = similar(str(out), str(outside), k=1)
    assert kind == "image" and new_hits[0].key == "rocket.jpg" and new_hits[0].score > 0.999
    with Image.open(sheet) as img:
        assert img.format == "PNG" and img.width == GAP + 3 * (THUMB + GAP)
    assert cli("similar", out, "no-such-key").exit_code == 2


def test_a_query_that_is_no_picture_is_a_usage_refusal_and_a_damaged_picture_a_fault(tmp_path, photos, cli):
    """As for FILE (not an output: 2; an output, damaged: 1): a query file that holds no picture is
    the user's mistake, one that holds a picture that does not decode is a fault; one line each."""
    out = tmp_path / "t.h5"
    vitcore.extract([photos], out, OPTS, pool="mean")
    whole = (photos / "chelsea.jpg").read_bytes()
    cases = {
        "notes.txt": (b"shopping list", 2, "not a picture or clip"),
        "empty.jpg": (b"", 2, "an empty file"),
        "phone.jpg": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00" + bytes(64), 2, "a HEIF/HEIC picture, which Pillow cannot open"),
        "cut.jpg": (whole[: len(whole) // 8], 1, "a damaged JPEG file"),
        "cut.png": (b"\x89PNG\r\n\x1a\n" + bytes(20), 1, "a damaged PNG file"),
    }
    for name, (content, code, words) in cases.items():
        (tmp_path / name).write_bytes(content)
        result = cli("similar", out, tmp_path / name, "-k", "2")
        assert result.exit_code == code and words in result.stderr, (name, result.output)
        assert result.stderr.count("\n") == 1 and result.stdout == "", (name, result.output)
    assert cli("similar", out, tmp_path / "missing.jpg").exit_code == 2
    from vitcore.consumers.search import _unreadable_query  # gone between its check and its read: one line

    gone = _unreadable_query(str(tmp_path / "gone.jpg"), OSError("x"), None)
    assert isinstance(gone, UsageError) and str(gone).endswith("gone.jpg: No such file or directory")
    # A whole clip is no damage: a picture family's file is the wrong file for it (a usage refusal).
    from tests.helpers import make_clip

    clip = Path(make_clip(tmp_path / "clip.mp4", 6, 64, 48, 8))
    (tmp_path / "clip_named.jpg").write_bytes(clip.read_bytes())
    for query, words in ((clip, "is a video clip, and"), (tmp_path / "clip_named.jpg", "it holds a video clip (MP4)")):
        result = cli("similar", out, query, "-k", "2")
        assert result.exit_code == 2 and words in result.stderr and result.stderr.count("\n") == 1, result.output


def test_similar_on_a_pooled_file_uses_the_pooled_vectors(tmp_path, photos):
    """The scores are cosines of the stored pooled (max) vectors, ranked: computed here from the
    file by hand, they are what similar returns (mean vectors would rank and score otherwise)."""
    out = tmp_path / "p.h5"
    vitcore.extract([photos], out, OPTS, pool="max")
    hits, _ = similar(str(out), "coffee.jpg", k=100)  # every row
    with vitcore.open_tokens(out) as f:
        pooled = {k: f[k].astype(np.float64) for k in f.keys}
        assert f.h5["tokens"].ndim == 2 and "mean" not in f.h5  # pooled rows: (N, D)
        assert f.h5["tokens"].chunks == (128, f.h5["tokens"].shape[1])  # 128 pooled rows a chunk (README)
    query = pooled["coffee.jpg"] / np.linalg.norm(pooled["coffee.jpg"])
    expected = sorted(((k, float(v @ query / np.linalg.norm(v))) for k, v in pooled.items()), key=lambda kv: -kv[1])
    assert [h.key for h in hits] == [k for k, _ in expected]
    np.testing.assert_allclose([h.score for h in hits], [v for _, v in expected], rtol=0, atol=1e-5)


def test_sheet_file_problems_are_one_line_errors(tmp_path, photos, cli):
    out = tmp_path / "t.h5"
    vitcore.extract([photos], out, OPTS)
    no_extension = tmp_path / "sheet"
    assert cli("show", out, "--first", "2", "-o", no_extension).exit_code == 0
    with Image.open(no_extension) as img:
        assert img.format == "PNG"
    bad = cli("similar", out, "coffee.jpg", "--sheet", tmp_path / "missing" / "h.png", "--json")  # refused before the search
    assert bad.exit_code == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.output
    assert json.loads(bad.stdout)["exit_code"] == 2
    unwritable = tmp_path / "locked"
    unwritable.mkdir(mode=0o500)
    if os.access(unwritable, os.W_OK):  # root writes anywhere: a folder whose files cannot be made instead
        unwritable = tmp_path / "sheet"  # a file, not a folder
    bad = cli("show", out, "-o", unwritable / "s.png")
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.output


def test_a_new_image_is_encoded_with_the_files_weights_and_refused_when_they_changed(tmp_path, photos):
    from vitcore.errors import VitExtractError
    from vitcore.encoders.seed.weights import build_encoder, save_weights

    weights = tmp_path / "w.safetensors"
    save_weights(build_encoder(TINY, seed=5)[0], weights)
    out = tmp_path / "w.h5"
    vitcore.extract([photos], out, OPTS, model=None, weights=str(weights))
    outside = tmp_path / "query.jpg"
    shutil.copy(photos / "rocket.jpg", outside)
    hits, kind = similar(str(out), str(outside), k=1)
    assert kind == "image" and hits[0].key == "rocket.jpg" and hits[0].score > 0.999
    save_weights(build_encoder(TINY, seed=6)[0], weights)  # same architecture, other values
    with pytest.raises(VitExtractError, match="has changed since"):
        similar(str(out), str(outside), k=1)


def test_keys_with_control_characters_are_drawn_escaped_on_one_line(photos, tmp_path, cli):
    from vitcore.consumers.search import hits_sheet
    from vitcore.consumers.visualize import printable

    odd = "two\nlines\tand\x1bescape.jpg"
    shutil.copy(photos / "chelsea.jpg", photos / odd)
    out = tmp_path / "out.h5"
    vitcore.extract([photos], out, OPTS)
    assert printable(odd) == "two\\nlines\\tand\\x1bescape.jpg"
    # Characters the caption font cannot draw (it would draw boxes) are escaped too, legibly: no
    # character of a caption draws as the missing-glyph box, and the escapes read back to the name.
    from vitcore.consumers.visualize import NO_GLYPH, _glyph

    for name in ("東京 photo.jpg", "café.jpg", "Ωmega × 2.png"):
        shown = printable(name)
        assert all(_glyph(c) != _glyph(NO_GLYPH) for c in shown), shown
        assert shown.encode("ascii", "backslashreplace").decode("unicode_escape") == name
    image, chosen = token_sheet(str(out), [odd])
    assert chosen == [odd] and image.width > THUMB
    hits, kind = similar(str(out), odd, k=2)
    assert hits_sheet(str(out), hits, odd, kind).height > THUMB
    result = cli("similar", out, odd, "-k", "2", "--sheet", tmp_path / "hits.png")
    assert result.exit_code == 0 and (tmp_path / "hits.png").exists()


def test_a_name_stored_composed_under_one_root_and_decomposed_under_another_names_both_rows(tmp_path):
    """Since either form finds a key, café.jpg stored composed in a/ and decomposed in b/ is one name
    for two rows: refused as a key stored twice is, and shown root-qualified."""
    import unicodedata

    from vitcore.store.reader import AmbiguousKey

    for root, form, grey in (("a", "NFC", 30), ("b", "NFD", 220)):
        (tmp_path / root).mkdir()
        Image.fromarray(np.full((40, 40, 3), grey, np.uint8)).save(tmp_path / root / unicodedata.normalize(form, "café.png"))
    out = tmp_path / "t.h5"
    vitcore.extract([tmp_path / "a", tmp_path / "b"], out, OPTS)
    with vitcore.open_tokens(out) as f:
        assert len(f) == 2 and len(set(f.keys)) == 2
        for typed in ("café.png", unicodedata.normalize("NFD", "café.png")):
            with pytest.raises(AmbiguousKey, match="names 2 rows"):
                f.index(typed)
        shown = [f.shown_key(i) for i in range(2)]
        assert all(os.path.isabs(k) for k in shown) and [f.index(k) for k in shown] == [0, 1]


def test_a_key_under_two_roots_never_silently_picks_a_row(tmp_path, cli):
    """run a/ b/ with a/x.png and b/x.png: every lookup refuses the bare key and names both
    candidates; ROOT/KEY selects one (checked against the row's tokens read directly)."""
    for root, grey in (("a", 30), ("b", 220)):
        (tmp_path / root).mkdir()
        Image.fromarray(np.full((40, 40, 3), grey, np.uint8)).save(tmp_path / root / "x.png")
        Image.fromarray(np.full((40, 40, 3), grey + 10, np.uint8)).save(tmp_path / root / f"only_{root}.png")
    out = tmp_path / "twice.h5"
    vitcore.extract([tmp_path / "a", tmp_path / "b"], out, OPTS)
    qualified = {root: str(tmp_path / root / "x.png") for root in ("a", "b")}
    with vitcore.open_tokens(out) as f:
        rows = {root: [i for i, k in enumerate(f.keys) if k == "x.png" and f.qualified_key(i) == qualified[root]][0]
                for root in ("a", "b")}
        tokens = {root: f.h5["tokens"][rows[root]] for root in ("a", "b")}
        assert not np.array_equal(tokens["a"], tokens["b"])
        for lookup in (lambda: f["x.png"], lambda: f.index("x.png"), lambda: f.mean("x.png"),
                       lambda: f.source_bytes("x.png"), lambda: f.token_grid("x.png")):
            with pytest.raises(UsageError, match=r"'x.png' names 2 rows") as refused:
                lookup()
            assert qualified["a"] in str(refused.value) and qualified["b"] in str(refused.value)
        for root in ("a", "b"):
            assert qualified[root] in f and f.index(qualified[root]) == rows[root]
            np.testing.assert_array_equal(f[qualified[root]], tokens[root])
            assert f.shown_key(rows[root]) == qualified[root]
        assert f.shown_key(f.index("only_a.png")) == "only_a.png"  # a unique key stays as it is
    with pytest.raises(UsageError, match="names 2 rows"):
        vitcore.TokenDataset(out, keys=["x.png"])
    assert vitcore.TokenDataset(out, keys=[qualified["b"]]).rows == [rows["b"]]

    refused = cli("similar", out, "x.png", "-k", "2")
    assert refused.exit_code == 2 and qualified["a"] in refused.output and qualified["b"] in refused.output
    found = cli("similar", out, qualified["b"], "-k", "4", "--json")
    assert found.exit_code == 0, found.output
    hits = json.loads(found.stdout)
    assert hits[0]["key"] == qualified["b"] and hits[0]["score"] > 0.9999
    assert qualified["a"] in [h["key"] for h in hits]  # the other x.png is shown with its root
    assert cli("show", out, "x.png", "-o", tmp_path / "s.png").exit_code == 2
    shown = cli("show", out, qualified["a"], "-o", tmp_path / "s.png")
    assert shown.exit_code == 0, shown.output


def test_a_root_qualified_key_finds_its_row_when_roots_nest(tmp_path, monkeypatch):
    """run x.png a/ from the folder holding both: roots are that folder and a/ inside it, and both
    store x.png; each qualified key names its own row."""
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((40, 40, 3), 30, np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(np.full((40, 40, 3), 220, np.uint8)).save(tmp_path / "a" / "x.png")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "nested.h5"
    vitcore.extract(["x.png", "a"], out, OPTS)
    with vitcore.open_tokens(out) as f:
        assert len(f.roots) == 2 and f.roots[1].startswith(f.roots[0])
        for path in (tmp_path / "x.png", tmp_path / "a" / "x.png"):
            row = f.index(str(path))
            assert f.qualified_key(row) == str(path) and f.original_path(row) == str(path)
        assert f.index(str(tmp_path / "x.png")) != f.index(str(tmp_path / "a" / "x.png"))


def test_a_file_name_with_a_backslash_is_found_by_its_own_name(tmp_path, cli):
    """The key escapes a literal backslash (\\\\); the name as it is on disk still finds its row."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    name = "back\\slash.png"
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(folder / name)
    out = tmp_path / "b.h5"
    vitcore.extract([folder], out, OPTS)
    with vitcore.open_tokens(out) as f:
        assert f.keys == ["back\\\\slash.png"] and name in f and f.index(name) == 0
    assert cli("show", out, name, "-o", tmp_path / "s.png").exit_code == 0


def test_long_captions_keep_their_end():
    """Two keys under long roots that differ only at the end stay told apart on a sheet."""
    from vitcore.consumers.visualize import _font, fitted

    root = "/data/very/long/dataset/path/for/the/shared/cluster/storage/project_alpha/raw/"
    a, b = fitted(root + "cam1/0001.jpg", 2 * THUMB), fitted(root + "cam2/0001.jpg", 2 * THUMB)
    assert a != b and "…" in a and a.endswith("cam1/0001.jpg") and _font().getlength(a) <= 2 * THUMB
    assert fitted("short.jpg", 2 * THUMB) == "short.jpg"
