"""Tar shards (WebDataset, as img2dataset and webdataset.TarWriter write them) and Parquet files
(Hugging Face datasets' Image struct) as inputs: the same tokens as loose files, captions kept,
broken members recorded, and sharding, torchrun and resume at member granularity."""

from __future__ import annotations

import io
import json
import os
import signal
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

import vitcore
import vitcore.consumers.visualize
from tests.helpers import TINY
from vitcore.errors import ResumeMismatchError, UsageError
from vitcore.store.merge import merge
from vitcore.run.pipeline import ExtractOptions
from vitcore.run.shard import shard_path

PROJECT = Path(__file__).resolve().parent.parent
EXACT = ExtractOptions(model=TINY, out_dtype="float32", dtype="float32", device="cpu", workers=0, batch_size=3)
CLI_EXACT = ["--model", TINY, "--out-dtype", "float32", "--dtype", "float32", "--device", "cpu",
             "--workers", "0", "--batch-size", "3", "--quiet"]


def _pictures(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """(extension, encoded bytes) of small pictures of several sizes, PNG and JPEG."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
        buffer = io.BytesIO()
        ext = "jpg" if i % 3 else "png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, "JPEG" if ext == "jpg" else "PNG")
        out.append((ext, buffer.getvalue()))
    return out


def write_shards(folder: Path, pictures, per_shard: int) -> list[Path]:
    """img2dataset's layout: NNNNN.tar of samples NNNNNNNNN.{jpg,txt,json}; the same pictures loose."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "loose").mkdir(exist_ok=True)
    shards = []
    for start in range(0, len(pictures), per_shard):
        shard = folder / f"{start // per_shard:05d}.tar"
        with wds.TarWriter(str(shard)) as writer:
            for i in range(start, min(start + per_shard, len(pictures))):
                ext, data = pictures[i]
                key = f"{i:09d}"
                sample = {"__key__": key, ext: data, "json": {"url": f"https://example.com/{i}", "key": key}}
                if i % 4:  # some samples have no caption: stored as ""
                    sample["txt"] = f"a picture, number {i} ✓"
                writer.write(sample)
                (folder / "loose" / f"{key}.{ext}").write_bytes(data)
        shards.append(shard)
    return shards


def write_parquet(path: Path, pictures, row_group_size: int = 4) -> None:
    """As Hugging Face datasets writes an Image column: struct<bytes: binary, path: string>."""
    rows = [{"image": {"bytes": data, "path": f"{i:09d}.{ext}"}, "caption": f"caption {i}", "url": f"u{i}", "n": i}
            for i, (ext, data) in enumerate(pictures)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


def _rows(path) -> dict[str, np.ndarray]:
    with vitcore.open_tokens(path) as f:
        return {k: f[k] for k in f.keys}


def test_tar_shards_and_parquet_give_the_tokens_of_loose_files_with_their_captions(tmp_path, monkeypatch):
    pictures = _pictures(11)
    shards = write_shards(tmp_path / "data", pictures, per_shard=4)
    write_parquet(tmp_path / "train-0000.parquet", pictures)
    loose = _rows_of_run(tmp_path, [tmp_path / "data" / "loose"], "loose.h5")

    monkeypatch.chdir(tmp_path)  # files named directly are keyed as given
    # Brace ranges are expanded by us, as WebDataset does.
    result = vitcore.extract(["data/{00000..00002}.tar"], tmp_path / "tar.h5", EXACT, keep="txt,json")
    assert result.found == 11 and result.rows == 11 and not result.failures
    with vitcore.open_tokens(tmp_path / "tar.h5") as f:
        assert f.keys[:5] == ["data/00000.tar/000000000.png", "data/00000.tar/000000001.jpg", "data/00000.tar/000000002.jpg",
                              "data/00000.tar/000000003.png", "data/00001.tar/000000004.jpg"]
        for key in f.keys:  # bit-identical to the same picture read as a loose file
            name = key.rpartition("/")[2]
            np.testing.assert_array_equal(f[key], loose[name])
            assert f.source_bytes(key) == (tmp_path / "data" / "loose" / name).read_bytes()
        assert f.meta_names == ["txt", "json"]
        captions, records = f.meta("txt"), f.meta("json")
        assert captions[0] is None and captions[5] == "a picture, number 5 ✓"  # sample 0 has no caption
        assert [json.loads(r)["key"] for r in records] == [k.rpartition("/")[2].partition(".")[0] for k in f.keys]
    with h5py.File(tmp_path / "tar.h5", "r") as h5:  # plain h5py reads them, row-aligned with paths
        assert h5["meta/txt"].asstr()[5] == "a picture, number 5 ✓" and len(h5["meta/txt"]) == len(h5["paths"])
        assert h5["meta/txt"].asstr()[0] == "" and h5["meta_absent/txt"][0] == 1 and h5["meta_absent/txt"][5] == 0

    result = vitcore.extract(["train-0000.parquet"], tmp_path / "pq.h5", EXACT, columns="caption,url,n")
    assert result.rows == 11 and not result.failures
    with vitcore.open_tokens(tmp_path / "pq.h5") as f:
        assert f.keys[:3] == ["train-0000.parquet/row=0", "train-0000.parquet/row=1", "train-0000.parquet/row=2"]
        assert f.keys[10] == "train-0000.parquet/row=10"  # the file's order, not the text's
        for i, key in enumerate(f.keys):
            ext, data = pictures[i]
            np.testing.assert_array_equal(f[key], loose[f"{i:09d}.{ext}"])
            assert f.source_bytes(key) == data
        assert f.meta("caption") == [f"caption {i}" for i in range(11)] and f.meta("url", 3) == "u3"
        assert f.meta("n", 7) == "7"  # a number column, as text

    # Mixed with loose files in one folder, and named in a --files-from list.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "loose.png").write_bytes(pictures[0][1])
    os.link(shards[1], mixed / "s.tar")
    os.link(tmp_path / "train-0000.parquet", mixed / "t.parquet")
    result = vitcore.extract([mixed], tmp_path / "mixed.h5", EXACT)
    assert result.rows == 1 + 4 + 11
    listing = tmp_path / "list.txt"
    listing.write_text("data/{00000..00001}.tar\ndata/loose/000000010.jpg\n")
    result = vitcore.extract([], tmp_path / "listed.h5", EXACT, files_from=str(listing))
    assert result.rows == 9


def _rows_of_run(tmp_path, inputs, name, **options) -> dict[str, np.ndarray]:
    vitcore.extract(inputs, tmp_path / name, EXACT, **options)
    return _rows(tmp_path / name)


def test_broken_members_and_rows_are_failure_records_and_the_rest_is_kept(tmp_path):
    pictures = _pictures(6)
    good = write_shards(tmp_path / "good", pictures, per_shard=6)[0]
    reference = _rows_of_run(tmp_path, [tmp_path / "good" / "loose"], "good.h5")
    folder = tmp_path / "in"
    folder.mkdir()
    # A member that is not an image, and a link member to nothing in the tar.
    with tarfile.open(folder / "odd.tar", "w") as tar:
        for name, data in (("000.jpg", b"this is text, not a JPEG"), ("001.png", pictures[0][1])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("002.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "gone.png"
        tar.addfile(link)
    data = good.read_bytes()
    with tarfile.open(good) as tar:
        members = {m.name: m for m in tar.getmembers()}
    cut_member = members["000000003.png"]
    # Cut inside the data of member 3: members 0-2 whole, 3 short, the rest gone.
    (folder / "cut.tar").write_bytes(data[: cut_member.offset_data + cut_member.size // 2])
    # Cut exactly at a header boundary (tarfile would stop without a word).
    (folder / "clean_cut.tar").write_bytes(data[: members["000000002.jpg"].offset_data - 512 * 3])
    import gzip

    packed = gzip.compress(data)
    (folder / "packed.tar.gz").write_bytes(packed[: len(packed) * 3 // 4])  # a compressed tar cut short
    rows = [{"image": {"bytes": pictures[1][1], "path": "a.png"}}, {"image": {"bytes": None, "path": "b.png"}},
            {"image": None}, {"image": {"bytes": b"garbage", "path": "c.png"}}]
    pq.write_table(pa.Table.from_pylist(rows), folder / "t.parquet")
    (folder / "empty.parquet").write_bytes(b"PAR1 not really")

    result = vitcore.extract([folder], tmp_path / "out.h5", EXACT)
    failures = dict(result.failures)
    assert failures["odd.tar/000.jpg"].startswith("UnidentifiedImageError") and "'000.jpg'" in failures["odd.tar/000.jpg"]
    assert "a link to gone.png, which is not a file in this tar" in failures["odd.tar/002.png"]
    assert "cut short" in failures["cut.tar/000000003.png"]
    assert "cut short" in failures["cut.tar/"] and "000000003.png" in failures["cut.tar/"]
    assert "end-of-archive" in failures["clean_cut.tar/"]
    assert "cut short" in failures["packed.tar.gz/"]
    assert "no image bytes" in failures["t.parquet/row=1"] and "b.png" in failures["t.parquet/row=1"]
    assert "null" in failures["t.parquet/row=2"] and "UnidentifiedImageError" in failures["t.parquet/row=3"]
    assert "Parquet" in failures["empty.parquet/"]
    out = _rows(tmp_path / "out.h5")
    packed = sorted(k for k in out if k.startswith("packed.tar.gz/"))  # the members before the cut
    assert packed and all(k.partition("/")[2] in reference for k in packed)
    assert sorted(k for k in out if k not in packed) == [
        "clean_cut.tar/000000000.png", "clean_cut.tar/000000001.jpg", "cut.tar/000000000.png",
        "cut.tar/000000001.jpg", "cut.tar/000000002.jpg", "odd.tar/001.png", "t.parquet/row=0"]
    for key in packed:
        np.testing.assert_array_equal(out[key], reference[key.partition("/")[2]])
    for key in ("cut.tar/000000000.png", "cut.tar/000000002.jpg", "clean_cut.tar/000000001.jpg"):
        np.testing.assert_array_equal(out[key], reference[key.partition("/")[2]])


def test_container_usage_errors_are_one_line(tmp_path):
    pictures = _pictures(3)
    write_parquet(tmp_path / "t.parquet", pictures)
    shard = write_shards(tmp_path / "d", pictures, per_shard=3)[0]
    cases = [
        (dict(columns="caption,title"), [tmp_path / "t.parquet"], "no column 'title'"),
        (dict(image_column="caption"), [tmp_path / "t.parquet"], "not image bytes"),
        (dict(keep="txt", columns="txt"), [shard], "both name txt"),
        (dict(), [tmp_path / "d" / "{00000..00003}.tar"], "does not exist"),
    ]
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "text.parquet")
    cases.append((dict(), [tmp_path / "text.parquet"], "no column holds image bytes"))
    for options, inputs, words in cases:
        with pytest.raises(UsageError, match=words):
            vitcore.extract(inputs, tmp_path / "x.h5", EXACT, **options)
    vitcore.extract([shard], tmp_path / "kept.h5", EXACT, keep="txt")
    with pytest.raises(ResumeMismatchError, match="--keep / --columns"):
        vitcore.extract([shard], tmp_path / "kept.h5", EXACT, keep="txt,json", resume=True)


def test_shards_and_merge_over_tar_shards_equal_one_run(tmp_path, monkeypatch):
    from vitcore.store import merge as merging

    # merge copies in blocks (memory near one block): blocks smaller than a shard, so several are used
    monkeypatch.setattr(merging, "TEXT_BLOCK", 2)
    monkeypatch.setattr(merging, "COPY_BLOCK", 3)
    shards = write_shards(tmp_path / "data", _pictures(13), per_shard=5)
    single = tmp_path / "single.h5"
    vitcore.extract(shards, single, EXACT, keep="txt")
    out = tmp_path / "out.h5"
    parts = [shard_path(str(out), i, 3) for i in range(3)]
    for i, part in enumerate(parts):
        vitcore.extract(shards, part, EXACT, keep="txt", shard=(i, 3))
    with vitcore.open_tokens(parts[1]) as f:  # a range of members, cutting across the tar files
        assert f.keys[0].endswith("/00000.tar/000000004.jpg") and f.keys[-1].endswith("/00001.tar/000000007.jpg")
    for virtual in (False, True):
        merged = tmp_path / f"merged{virtual}.h5"
        merge(str(merged), parts, virtual=virtual)
        with vitcore.open_tokens(merged) as f, vitcore.open_tokens(single) as g:
            assert f.keys == g.keys and f.meta("txt") == g.meta("txt") and f.meta_names == ["txt"]
            for key in g.keys:
                np.testing.assert_array_equal(f[key], g[key])


def test_torchrun_over_tar_shards_equals_one_process(tmp_path):
    shards = write_shards(tmp_path / "data", _pictures(9), per_shard=4)
    single = tmp_path / "single.h5"
    vitcore.extract(shards, single, EXACT, keep="json")
    out = tmp_path / "dist.h5"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vitcore.cli", "run",
           str(tmp_path / "data" / "{00000..00002}.tar"), "-o", str(out), "--keep", "json", *CLI_EXACT]
    done = subprocess.run(cmd, cwd=PROJECT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with vitcore.open_tokens(out) as f, vitcore.open_tokens(single) as g:
        assert f.keys == g.keys and f.meta("json") == g.meta("json")
        for key in g.keys:
            np.testing.assert_array_equal(f[key], g[key])


def test_sigkill_then_resume_over_tar_shards_equals_an_uninterrupted_run(tmp_path):
    shards = write_shards(tmp_path / "data", _pictures(40, seed=3), per_shard=10)
    single = tmp_path / "single.h5"
    vitcore.extract(shards, single, EXACT, keep="txt")
    out = tmp_path / "out.h5"
    cmd = [sys.executable, "-m", "vitcore.cli", "run", *map(str, shards), "-o", str(out), "--keep", "txt",
           *[a if a != "3" else "1" for a in CLI_EXACT]]  # one image a batch: many commits
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HDF5_USE_FILE_LOCKING": "FALSE"}
    partial = None
    # Until the kill lands mid-run; on a loaded machine the test may see the first commit late, so the
    # first tries kill at once.
    for delay in (0.0, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 0.0):
        out.unlink(missing_ok=True)
        process = subprocess.Popen(cmd, cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
            if out.exists() and _committed(out) >= 1:
                time.sleep(delay / 10)
                break
        process.send_signal(signal.SIGKILL)
        process.wait()
        if out.exists() and 0 < _committed(out) < 40:
            partial = _committed(out)
            break
    assert partial is not None, "the run was never caught mid-way"
    result = vitcore.extract(shards, out, EXACT, keep="txt", resume=True)
    assert result.skipped == partial and result.written == 40 - partial
    with vitcore.open_tokens(out) as f, vitcore.open_tokens(single) as g:
        assert f.keys == g.keys and f.meta("txt") == g.meta("txt")
        for key in g.keys:
            np.testing.assert_array_equal(f[key], g[key])


def _committed(path) -> int:
    try:
        with h5py.File(path, "r", locking=False) as h5:
            return int(h5.attrs.get("committed", 0))
    except OSError:
        return 0


def test_show_and_similar_find_the_pictures_inside_containers(tmp_path, monkeypatch):
    pictures = _pictures(6)
    write_shards(tmp_path / "data", pictures, per_shard=3)
    write_parquet(tmp_path / "data" / "t.parquet", pictures)
    from vitcore.consumers.search import hits_sheet, similar
    from vitcore.consumers.visualize import token_sheet

    monkeypatch.chdir(tmp_path / "data")
    for inputs, key in ((["00000.tar", "00001.tar"], "00001.tar/000000004.jpg"), (["t.parquet"], "t.parquet/row=4")):
        out = tmp_path / f"{key[:3]}.h5"
        vitcore.extract(inputs, out, EXACT)
        hits, kind = similar(str(out), key, k=2)
        assert kind == "key" and hits[0].key == key and hits[0].score > 0.9999
        hits, kind = similar(str(out), str(tmp_path / "data" / "loose" / "000000004.jpg"), k=1)
        assert kind == "image" and hits[0].key == key and hits[0].score > 0.9999
        placeholders = []
        real = vitcore.consumers.visualize.placeholder
        spy = lambda text, *a: placeholders.append(text) or real(text, *a)  # noqa: E731
        monkeypatch.setattr(vitcore.consumers.visualize, "placeholder", spy)
        monkeypatch.setattr(vitcore.consumers.search, "placeholder", spy)
        hits_sheet(str(out), hits, key, "key")
        token_sheet(str(out), keys=[key])
        assert placeholders == []  # every original was found inside its container
        monkeypatch.undo()
        monkeypatch.chdir(tmp_path / "data")


def _tar(path: Path, members) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_tars_are_read_as_tar_extracts_them(tmp_path):
    """A name written twice is the later member (with the later caption); tars joined with cat
    give every member; bytes after the end-of-archive blocks lose nothing and raise no alarm."""
    pictures = _pictures(4)
    a, b = pictures[0][1], pictures[3][1]  # two different PNGs
    c, d = _pictures(2, seed=1)
    folder = tmp_path / "in"
    folder.mkdir()
    _tar(folder / "dup.tar", [("d.png", a), ("d.txt", b"first"), ("./d.png", b), ("d.TXT", b"second")])
    first = _tar(tmp_path / "one.tar", [(f"one.{c[0]}", c[1])])
    second = _tar(tmp_path / "two.tar", [(f"two.{d[0]}", d[1])])
    (folder / "joined.tar").write_bytes(first.read_bytes() + second.read_bytes())
    (folder / "trailing.tar").write_bytes(first.read_bytes() + b"a note someone appended\n")
    result = vitcore.extract([folder], tmp_path / "out.h5", EXACT, keep="txt")
    assert result.failures == [] and result.duplicates_dropped == 0
    with vitcore.open_tokens(tmp_path / "out.h5") as f:
        assert f.keys == ["dup.tar/d.png", f"joined.tar/one.{c[0]}", f"joined.tar/two.{d[0]}", f"trailing.tar/one.{c[0]}"]
        assert f.meta("txt", 0) == "second"  # the caption of the member taken: the later one
        assert f.source_bytes(0) == b
        (tmp_path / "b.png").write_bytes(b)
        np.testing.assert_array_equal(f[0], _rows_of_run(tmp_path, [tmp_path / "b.png"], "b.h5")[str(tmp_path / "b.png")])


def test_an_img2dataset_folder_with_its_metadata_parquet_files(tmp_path):
    """img2dataset writes NNNNN.parquet (url, caption, status; no image bytes) beside each tar."""
    shards = write_shards(tmp_path / "i2d", _pictures(4), per_shard=2)
    for shard in shards:
        pq.write_table(pa.table({"url": ["u", "v"], "caption": ["c", "d"]}), shard.with_suffix(".parquet"))
    (tmp_path / "i2d" / "loose").rename(tmp_path / "elsewhere")
    result = vitcore.extract([tmp_path / "i2d"], tmp_path / "out.h5", EXACT, keep="txt")
    assert result.rows == 4 and not result.failures
    assert any("2 Parquet files" in w and "00000.parquet" in w for w in result.warnings)
    with pytest.raises(UsageError, match="no column holds image bytes"):  # named: refused
        vitcore.extract([shards[0].with_suffix(".parquet")], tmp_path / "x.h5", EXACT)


def test_a_fixed_container_is_tried_again_with_retry_failed(tmp_path, monkeypatch):
    pictures = _pictures(6)
    shard = write_shards(tmp_path / "data", pictures, per_shard=6)[0]
    whole = shard.read_bytes()
    with tarfile.open(shard) as tar:
        cut = tar.getmember("000000003.png").offset_data - 512
    shard.write_bytes(whole[:cut])  # cut at a header: members 3-5 missing
    monkeypatch.chdir(tmp_path / "data")
    listing = tmp_path / "list.txt"
    listing.write_text("00000.tar\n00001.tar\n")  # 00001.tar does not exist yet
    first = vitcore.extract([], tmp_path / "out.h5", EXACT, files_from=str(listing))
    assert sorted(dict(first.failures)) == ["00000.tar/", "00001.tar"] and first.rows == 3
    shard.write_bytes(whole)
    write_shards(tmp_path / "more", _pictures(2, seed=5), per_shard=2)[0].rename(tmp_path / "data" / "00001.tar")
    again = vitcore.extract([], tmp_path / "out.h5", EXACT, files_from=str(listing), resume=True, retry_failed=True)
    assert again.failures == [] and again.rows == 6 + 2
    with vitcore.open_tokens(tmp_path / "out.h5") as f:
        assert f.failures == []  # the records of the two containers went with their retry


def test_the_image_column_is_recorded_and_compared(tmp_path):
    pictures, thumbs = _pictures(3), _pictures(3, seed=9)
    rows = [{"image": {"bytes": p[1], "path": "p"}, "thumb": {"bytes": t[1], "path": "t"}} for p, t in zip(pictures, thumbs)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "two.parquet")
    out = tmp_path / "thumbs.h5"
    vitcore.extract([tmp_path / "two.parquet"], out, EXACT, image_column="thumb")
    with vitcore.open_tokens(out) as f:
        assert f.source_bytes(1) == thumbs[1][1]  # the column the row was made from
    with pytest.raises(ResumeMismatchError, match="--image-column"):
        vitcore.extract([tmp_path / "two.parquet"], out, EXACT, resume=True)


def test_meta_names_and_empty_containers_are_checked_in_one_line(tmp_path):
    shard = write_shards(tmp_path / "d", _pictures(2), per_shard=2)[0]
    for bad in (".", "..", "a/b"):
        with pytest.raises(UsageError, match="not a name that can be stored"):
            vitcore.extract([shard], tmp_path / "x.h5", EXACT, keep=bad)
    empty = _tar(tmp_path / "empty.tar", [("readme.md", b"hello")])
    with pytest.raises(UsageError, match="empty.tar holds no image"):
        vitcore.extract([empty], tmp_path / "x.h5", EXACT)
    # beside pictures in a folder, it is said in the summary (it was left out without a word)
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(empty, folder / "empty.tar")
    shutil.copy(shard, folder / shard.name)
    result = vitcore.extract([folder], tmp_path / "m.h5", EXACT)
    assert result.rows == 2 and any(w.startswith("1 container file with no image: ") and "empty.tar holds no image"
                                    in w for w in result.warnings), result.warnings
    vitcore.extract([shard], tmp_path / "k.h5", EXACT, keep="TXT,json")  # any case, any order
    result = vitcore.extract([shard], tmp_path / "k.h5", EXACT, keep="json,txt", resume=True)
    assert result.skipped == 2


def test_parquet_rows_are_read_a_few_at_a_time_and_a_bad_stretch_fails_only_its_rows(tmp_path, monkeypatch):
    import vitcore.inputs.parquet

    pictures = _pictures(12)
    write_parquet(tmp_path / "t.parquet", pictures, row_group_size=6)
    monkeypatch.setattr(vitcore.inputs.parquet, "PARQUET_READ_ROWS", 2)
    real = pq.ParquetFile.iter_batches
    sizes = []

    def breaking(self, *args, **kwargs):  # the second stretch of row group 0 cannot be decoded
        for n, batch in enumerate(real(self, *args, **kwargs)):
            sizes.append(len(batch))
            if kwargs["row_groups"] == [0] and n == 1:
                raise OSError("Couldn't deserialize thrift: a damaged page header (a fake fault)")
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", breaking)
    result = vitcore.extract([tmp_path / "t.parquet"], tmp_path / "out.h5", EXACT)
    failed = {key.rpartition("=")[2]: reason for key, reason in result.failures}
    assert sorted(failed, key=int) == ["2", "3", "4", "5"]
    assert all("row group could not be decoded" in reason and "thrift" in reason for reason in failed.values())
    assert result.rows == 8 and set(sizes) == {2}  # never more than 2 rows decoded at a time


@pytest.mark.parametrize("layout", ["datasets Sequence(Image())", "list of binary"])
def test_a_row_with_a_list_of_images_gives_one_row_per_image(tmp_path, layout, monkeypatch):
    """VLM data keeps several images per row (list<struct<bytes, path>>, or list<binary>): one row per
    image, keyed row=N/image=K, with the row's --columns text, tokens equal to the same images loose."""
    pictures = _pictures(6, seed=3)
    per_row = [[0, 1], [], [2], [3, 4, 5]]  # picture indices in each row's list; row 1 has none
    loose = tmp_path / "loose"
    loose.mkdir()
    for i, (ext, data) in enumerate(pictures):
        (loose / f"{i}.{ext}").write_bytes(data)
    if layout == "list of binary":
        images = pa.array([[pictures[i][1] for i in row] for row in per_row], type=pa.list_(pa.binary()))
    else:
        kind = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        images = pa.array([[{"bytes": pictures[i][1], "path": f"{i}.{pictures[i][0]}"} for i in row] for row in per_row],
                          type=kind)
    table = pa.table({"caption": [f"row {r}" for r in range(len(per_row))], "images": images})
    pq.write_table(table, tmp_path / "vlm.parquet", row_group_size=2)
    out = tmp_path / "vlm.h5"
    monkeypatch.chdir(tmp_path)
    vitcore.extract(["vlm.parquet"], out, EXACT, columns="caption")
    reference = _rows_of_run(tmp_path, [loose], "loose.h5")
    expected = [(r, k, i) for r, row in enumerate(per_row) for k, i in enumerate(row)]
    with vitcore.open_tokens(out) as f:
        assert f.keys == [f"vlm.parquet/row={r}/image={k}" for r, k, _ in expected]
        assert f.meta("caption") == [f"row {r}" for r, _, _ in expected]
        assert f.settings["image_column"] is None and f.settings["image_columns_used"] == ["images"]  # chosen
        assert f.failures == [("vlm.parquet/row=1", "ValueError: this row holds no image: its image list is empty")]
        for key, (_, _, i) in zip(f.keys, expected):
            np.testing.assert_array_equal(f[key], reference[f"{i}.{pictures[i][0]}"])
            assert f.source_bytes(key) == pictures[i][1]  # read back by its key


def test_tar_members_passed_over_are_counted_like_loose_files(tmp_path):
    """A tar's members that are neither images nor kept sidecars are counted by extension, as loose
    files are (an AVIF left out by --ext, a stray stats file); kept sidecars are not counted."""
    pictures = _pictures(3, seed=5)
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, (ext, data) in enumerate(pictures):
            for name, payload in ((f"{i:03d}.{ext}", data), (f"{i:03d}.txt", b"caption"), (f"{i:03d}.avif", b"\0" * 8)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        info = tarfile.TarInfo("_stats.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    result = vitcore.extract([shard], tmp_path / "t.h5", EXACT, keep="txt")
    assert result.rows == 3 and result.passed_over == {"avif": 3, "json": 1}
    assert any("passed over by extension (avif 3, json 1)" in w for w in result.warnings)


def _tar_bytes(entries) -> bytes:
    """A tar of (name, bytes) files, ("dir/", None) directories and (name, "->target") / ("=>target") links."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
            elif isinstance(data, str):
                info.type = tarfile.SYMTYPE if data.startswith("->") else tarfile.LNKTYPE
                info.linkname = data[2:]
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if isinstance(data, bytes) else None)
    return buffer.getvalue()


def test_compressed_tars_are_read_as_streams_judged_by_content_and_equal_the_plain_tar(tmp_path):
    """webdataset writes .tar.gz: gzip, bzip2 and xz tars give the rows and sidecars of the same tar
    uncompressed, whatever their name says; a link member is the member it names; zstd (not in the
    standard library) and a cut stream are failure records; nothing is passed over unsaid."""
    import bz2
    import gzip
    import lzma

    pictures = _pictures(7, seed=3)
    entries = [("meta/", None)]
    for i, (ext, data) in enumerate(pictures):  # each caption before its image: read in one forward pass
        entries += [(f"{i:03d}.txt", f"caption {i}".encode()), (f"{i:03d}.{ext}", data)]
    entries += [("100.png", f"=>000.{pictures[0][0]}"), ("101.jpg", f"->001.{pictures[1][0]}"), ("102.jpg", "->nowhere.jpg")]
    plain = _tar_bytes(entries)
    folder = tmp_path / "in"
    folder.mkdir()
    variants = {"plain.tar": plain, "gz.tar.gz": gzip.compress(plain), "bz.tar.bz2": bz2.compress(plain),
                "xz.tar.xz": lzma.compress(plain), "gzip-named.tar": gzip.compress(plain), "plain-named.tgz": plain}
    for name, data in variants.items():
        (folder / name).write_bytes(data)
    (folder / "z.tar.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 64)
    result = vitcore.extract([folder], tmp_path / "t.h5", ExtractOptions(**{**vars(EXACT), "workers": 2}), keep="txt")

    failures = dict(result.failures)
    zstd = failures.pop("z.tar.zst/")
    assert "zstd" in zstd and "decompress it first" in zstd
    assert set(failures) == {f"{name}/102.jpg" for name in variants}  # the link to nothing, in each
    assert all("a link to nowhere.jpg, which is not a file in this tar" in e for e in failures.values())
    assert result.entries_passed_over == {"tar_directory": len(variants)}
    assert any("directory entries inside tars: 6" in w for w in result.warnings)
    with vitcore.open_tokens(tmp_path / "t.h5") as f:
        rows = {k: f[k] for k in f.keys}
        captions = dict(zip(f.keys, f.meta("txt")))
        members = sorted(k.partition("/")[2] for k in f.keys if k.startswith("plain.tar/"))
        assert len(members) == 9  # 7 pictures and the 2 links that name one
        for name in variants:
            for member in members:
                np.testing.assert_array_equal(rows[f"{name}/{member}"], rows[f"plain.tar/{member}"])
                assert captions[f"{name}/{member}"] == captions[f"plain.tar/{member}"]
            assert f.source_bytes(f"{name}/002.{pictures[2][0]}") == pictures[2][1]  # read back by its key
        np.testing.assert_array_equal(rows["gz.tar.gz/100.png"], rows[f"gz.tar.gz/000.{pictures[0][0]}"])
        np.testing.assert_array_equal(rows["xz.tar.xz/101.jpg"], rows[f"xz.tar.xz/001.{pictures[1][0]}"])
        assert captions[f"gz.tar.gz/003.{pictures[3][0]}"] == "caption 3"

    # Members read out of the tar's order (the second half, then the first: the stream starts again) are the same.
    for part in (1, 0):
        out = tmp_path / f"part{part}.h5"
        vitcore.extract([folder / "gz.tar.gz"], out, EXACT, keep="txt", shard=(part, 2))
        with vitcore.open_tokens(out) as f:
            assert len(f) >= 4
            for key in f.keys:
                np.testing.assert_array_equal(f[key], rows["gz.tar.gz/" + key.rpartition("gz.tar.gz/")[2]])


def test_columns_of_every_type_are_stored_as_text_or_valid_json_and_null_is_told_from_empty(tmp_path):
    """--columns: text as it is; numbers, lists, structs, maps, timestamps and dates as JSON that
    json.loads reads (ISO 8601 for times; NaN and infinities as null, counted); a null value is
    marked absent (meta_absent/<name>), distinguishable from "" in the file, the reader and a merge."""
    import datetime
    import decimal

    pictures = _pictures(4, seed=9)
    utc = datetime.timezone.utc
    table = pa.table({
        "image": [{"bytes": data, "path": f"{i}.{ext}"} for i, (ext, data) in enumerate(pictures)],
        "caption": pa.array(["a cat", "", None, "naïve ✓"], pa.string()),
        "score": pa.array([0.5, float("nan"), None, float("inf")], pa.float64()),
        "when": pa.array([datetime.datetime(2024, 5, 1, 12, 30, tzinfo=utc), None,
                          datetime.datetime(1999, 12, 31, 23, 59, 59, tzinfo=utc), datetime.datetime(2000, 1, 1, tzinfo=utc)],
                         pa.timestamp("us", tz="UTC")),
        "day": pa.array([datetime.date(2024, 5, 1)] * 4, pa.date32()),
        "tags": pa.array([["x", "y"], [], None, ["z"]], pa.list_(pa.string())),
        "box": pa.array([{"w": 1, "h": 2.5}, {"w": 3, "h": float("nan")}, None, {"w": 0, "h": 0.0}]),
        "price": pa.array([decimal.Decimal("1.10"), None, decimal.Decimal("0.333"), decimal.Decimal("7")],
                          pa.decimal128(10, 3)),
        "ok": pa.array([True, False, None, True]),
        "raw": pa.array([b"bytes", b"", None, b"\xff"], pa.binary()),
        # what Python's datetime cannot hold must not cost an image its row
        "ns": pa.array([1714566600123456789, 1, None, -1], pa.timestamp("ns", tz="UTC")),
        "far": pa.array([300000, 0, None, -800000], pa.date32()),  # year 2791, 1970, -, before year 1
        "took": pa.array([90_000_000, 1, None, 0], pa.duration("us")),
        "small": pa.array([0.1, 1.5, None, float("nan")], pa.float32()),
        "map": pa.array([[("a", 1)], [], None, [("k", 1), ("k", 2)]], pa.map_(pa.string(), pa.int64())),
    })
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
    names = "caption,score,when,day,tags,box,price,ok,raw,ns,far,took,small,map"
    result = vitcore.extract([tmp_path / "t.parquet"], tmp_path / "t.h5", EXACT, columns=names)
    assert result.rows == 4 and not result.failures  # every image kept, whatever its row's values
    assert result.nonfinite_meta == {"score": 2, "box": 1, "small": 1}
    assert any("2 rows of --columns score held NaN or infinite numbers, stored as JSON null" in w for w in result.warnings)
    assert result.missing_meta == {name: 1 for name in names.split(",") if name != "day"}
    with vitcore.open_tokens(tmp_path / "t.h5") as f:
        stored = {name: f.meta(name) for name in names.split(",")}
        masks = {name: f.h5[f"meta_absent/{name}"][:].tolist() for name in names.split(",")}
    assert stored["caption"] == ["a cat", "", None, "naïve ✓"]  # null is None, empty is ""
    assert masks["caption"] == [0, 0, 1, 0]
    assert [json.loads(t) if t is not None else "-" for t in stored["score"]] == [0.5, None, "-", None]
    assert stored["when"][0] == '"2024-05-01T12:30:00+00:00"' and stored["when"][1] is None
    assert json.loads(stored["day"][0]) == "2024-05-01"
    assert [json.loads(t) if t is not None else "-" for t in stored["tags"]] == [["x", "y"], [], "-", ["z"]]
    assert json.loads(stored["box"][1]) == {"w": 3, "h": None}
    assert json.loads(stored["price"][0]) == "1.100" and stored["price"][1] is None
    assert stored["ok"] == ["true", "false", None, "true"]
    assert stored["raw"][:2] == ["bytes", ""] and stored["raw"][2] is None
    assert json.loads(stored["ns"][0]) == "2024-05-01T12:30:00.123456789Z"  # nanoseconds kept, ISO 8601
    assert json.loads(stored["far"][0]) == "2791-05-17" and json.loads(stored["far"][3]).startswith("-")
    assert [json.loads(t) for t in stored["took"][:2]] == [90.0, 1e-6]  # durations in seconds
    assert stored["small"][:2] == ["0.1", "1.5"]  # float32 by its own digits, not 0.10000000149011612
    assert [json.loads(t) if t else t for t in stored["map"]] == [{"a": 1}, {}, None, [["k", 1], ["k", 2]]]
    for name in names.split(","):  # every non-text value is valid JSON
        if name not in ("caption", "raw"):
            for text in stored[name]:
                if text is not None:
                    json.loads(text)

    # A shard merge keeps the masks; the dataset hands None for a missing value.
    out = tmp_path / "m.h5"
    parts = [shard_path(str(out), i, 2) for i in range(2)]
    for i, part in enumerate(parts):
        vitcore.extract([tmp_path / "t.parquet"], part, EXACT, columns="caption", shard=(i, 2))
    merge(str(out), parts)
    with vitcore.open_tokens(out) as f:
        assert f.meta("caption") == ["a cat", "", None, "naïve ✓"]
    assert [vitcore.TokenDataset(out)[i]["meta"]["caption"] for i in range(4)] == ["a cat", "", None, "naïve ✓"]


def test_a_file_made_before_absence_masks_resumes_and_gains_them(tmp_path):
    """0.3 files stored a missing sidecar as "" with no mask: resumed, the mask is made from the
    texts ("" read as missing, as those files meant it) and the new rows get their own."""
    pictures = _pictures(8, seed=4)
    shards = write_shards(tmp_path / "data", pictures, per_shard=4)  # samples 0 and 4 have no txt
    out = tmp_path / "t.h5"
    vitcore.extract([shards[0]], out, EXACT, keep="txt")
    with h5py.File(out, "r+") as h5:
        del h5["meta_absent"]  # as 0.3 wrote it
    vitcore.extract(shards, out, EXACT, keep="txt", resume=True)
    with vitcore.open_tokens(out) as f:
        captions = f.meta("txt")
        assert len(captions) == 8 and f.h5["meta_absent/txt"].shape == (8,)
    assert [c is None for c in captions] == [i % 4 == 0 for i in range(8)]
    assert captions[1] == "a picture, number 1 ✓"


def test_links_in_a_tar_are_read_as_tar_x_leaves_them(tmp_path):
    """A hard link is the file its target was when the link was written (a later entry of that
    name does not change it); a symbolic link is followed like a path, through a link to a folder
    too; a link may be a sidecar; a loop is named as one. A kept extension that is no sample's
    sidecar is counted, not dropped silently."""
    pictures = _pictures(3, seed=11)
    (ext0, first), (ext1, second), (ext2, third) = pictures
    (tmp_path / "in").mkdir()
    shard = tmp_path / "in" / "links.tar"
    shard.write_bytes(_tar_bytes([
        (f"a.{ext0}", first), (f"h.{ext0}", f"=>a.{ext0}"), (f"a.{ext0}", second),  # a rewritten after the link
        ("real/r.png", third), ("sub", "->real"), ("via.png", "->sub/r.png"),  # through a folder link
        ("cap.txt", b"the caption"), ("via.txt", "->cap.txt"),  # a sidecar that is a link
        ("loopA.jpg", "->loopB.jpg"), ("loopB.jpg", "->loopA.jpg"),
        ("s3.input.png", third), ("s3.outputs.txt", b"not this sample's sidecar"),
    ]))
    result = vitcore.extract([tmp_path / "in"], tmp_path / "t.h5", EXACT, keep="txt")
    failures = dict(result.failures)
    assert failures == {"links.tar/loopA.jpg": "OSError: a loop of symbolic links inside the tar",
                        "links.tar/loopB.jpg": "OSError: a loop of symbolic links inside the tar"}
    assert result.passed_over == {"txt, not a sidecar": 1}
    with vitcore.open_tokens(tmp_path / "t.h5") as f:
        assert f.source_bytes(f"links.tar/h.{ext0}") == first and f.source_bytes(f"links.tar/a.{ext0}") == second
        assert f.source_bytes("links.tar/via.png") == third
        assert f.meta("txt", "links.tar/via.png") == "the caption"
        reference = {k: f[k] for k in f.keys}
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "r.png").write_bytes(third)
    vitcore.extract([tmp_path / "one"], tmp_path / "r.h5", EXACT)
    with vitcore.open_tokens(tmp_path / "r.h5") as f:
        np.testing.assert_array_equal(reference["links.tar/via.png"], f["r.png"])


def test_a_compressed_tar_cut_short_keeps_whole_images_and_a_damaged_one_trusts_nothing(tmp_path):
    """Cut short: every image whose bytes came through is a row, even when its sidecar lay past the
    cut (the text is absent); a stream that fails its integrity check (gzip's CRC) may have given
    wrong bytes that decoded anyway, so none of its members is a row."""
    import gzip

    pictures = _pictures(4, seed=12)
    entries = []
    for i, (ext, data) in enumerate(pictures):  # each image before its sidecar, as webdataset sorts them
        entries += [(f"{i:03d}.{ext}", data), (f"{i:03d}.txt", (f"caption {i} " * 2000).encode())]
    plain = _tar_bytes(entries)
    end_of_image_2 = plain.index(pictures[2][1]) + len(pictures[2][1])
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "cut.tar.gz").write_bytes(gzip.compress(plain[: end_of_image_2 + 2048], mtime=0))
    damaged = bytearray(gzip.compress(plain, mtime=0))
    damaged[-8] ^= 0xFF  # the stored CRC: every byte decompresses, the check at the end fails
    (folder / "crc.tar.gz").write_bytes(bytes(damaged))
    result = vitcore.extract([folder], tmp_path / "t.h5", EXACT, keep="txt")
    failures = dict(result.failures)
    with vitcore.open_tokens(tmp_path / "t.h5") as f:
        rows = set(f.keys)
        captions = dict(zip(f.keys, f.meta("txt")))
    cut = sorted(k for k in rows if k.startswith("cut.tar.gz/"))
    assert cut == [f"cut.tar.gz/{i:03d}.{pictures[i][0]}" for i in range(3)]  # image 2 whole, its text cut off
    assert captions[cut[0]].startswith("caption 0") and captions[cut[2]] is None
    assert "cut short" in failures["cut.tar.gz/"]
    assert not any(k.startswith("crc.tar.gz/") for k in rows)
    untrusted = [e for k, e in failures.items() if k.startswith("crc.tar.gz/") and k != "crc.tar.gz/"]
    assert len(untrusted) == 4 and all("fails its integrity check" in e for e in untrusted)


def test_meta_options_asked_of_inputs_that_cannot_give_them_are_one_line(tmp_path):
    """--columns of tar shards or loose files, or --keep of Parquet files alone, would store "" in
    every row; refused in one line, naming the option that fits. Mixed inputs take both."""
    pictures = _pictures(3, seed=13)
    shard = write_shards(tmp_path / "d", pictures, per_shard=3)[0]
    write_parquet(tmp_path / "t.parquet", pictures)
    with pytest.raises(UsageError, match="--columns caption: none of these inputs is a Parquet file.*--keep"):
        vitcore.extract([shard], tmp_path / "a.h5", EXACT, columns="caption")
    with pytest.raises(UsageError, match="--keep txt: these inputs are Parquet files.*--columns"):
        vitcore.extract([tmp_path / "t.parquet"], tmp_path / "b.h5", EXACT, keep="txt")
    mixed = vitcore.extract([shard, tmp_path / "t.parquet"], tmp_path / "c.h5", EXACT, keep="txt", columns="caption")
    assert mixed.rows == 6
