"""Sharding: --shard + merge, torchrun on gloo, per-shard resume, a crashed rank, moved folders."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import vitcore
from tests.helpers import TINY
from vitcore.errors import ResumeMismatchError, UsageError
from vitcore.store.merge import merge
from vitcore.run.pipeline import ExtractOptions
from vitcore.run.shard import parse_shard, shard_path

PROJECT = Path(__file__).resolve().parent.parent
EXACT = ExtractOptions(model=TINY, out_dtype="float32", dtype="float32", device="cpu", workers=0, batch_size=3)
CLI_EXACT = ["--model", TINY, "--out-dtype", "float32", "--dtype", "float32", "--device", "cpu",
             "--workers", "0", "--batch-size", "3", "--quiet"]


@pytest.fixture
def images(tmp_path) -> Path:
    """About thirty small images, one of them broken, in two folders."""
    from PIL import Image

    folder = tmp_path / "imgs"
    for sub in ("a", "b"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(29):
        Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(folder / ("a" if i % 2 else "b") / f"{i:02d}.png")
    (folder / "a" / "15_broken.png").write_bytes(b"not a png")
    return folder


def _content(path) -> tuple[list[str], np.ndarray, list, np.ndarray]:
    with h5py.File(path, "r") as f:
        n = int(f.attrs["committed"])
        roots = json.loads(f.attrs["roots"])
        keys = [os.path.join(roots[i], k) for i, k in zip(f["root_index"][:n], f["paths"].asstr()[:n])]
        failed = sorted(f["failed/paths"].asstr()[:])
        return keys, f["tokens"][:n], failed, f["mean"][:n]


def _assert_same(a, b) -> None:
    keys_a, tokens_a, failed_a, mean_a = _content(a)
    keys_b, tokens_b, failed_b, mean_b = _content(b)
    assert keys_a == keys_b and failed_a == failed_b
    np.testing.assert_array_equal(tokens_a, tokens_b)
    np.testing.assert_array_equal(mean_a, mean_b)


def test_parse_shard_and_names():
    assert parse_shard("3/8") == (3, 8) and parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ("8/8", "1/0", "-1/2", "a/b", "3"):
        with pytest.raises(UsageError):
            parse_shard(bad)
    assert shard_path("/x/out.h5", 3, 8) == "/x/out.shard00003-of-00008.h5"


@pytest.mark.parametrize("count", [1, 2, 4])
def test_every_shard_then_merge_equals_one_run(images, tmp_path, count):
    single = tmp_path / "single.h5"
    vitcore.extract([images], single, EXACT)
    out = tmp_path / "out.h5"
    shards = []
    for i in range(count):
        shards.append(shard_path(str(out), i, count))
        vitcore.extract([images], shards[-1], EXACT, shard=(i, count))
    result = merge(str(out), shards, virtual=True)
    assert result.rows == 29 and result.failed == 1 and result.virtual
    _assert_same(out, single)
    with h5py.File(out, "r") as f:
        assert f["tokens"].is_virtual and f.attrs["complete"] and f.attrs["merged"] == "virtual"
    copied = tmp_path / "copied.h5"
    assert not merge(str(copied), shards).virtual  # the default: a self-contained copy
    _assert_same(copied, single)
    with h5py.File(copied, "r") as f:
        assert not f["tokens"].is_virtual and f.attrs["merged"] == "copy"
        # The merge's record of its shards: each file (relative), its rows and range, tiling the input list.
        recorded = json.loads(f.attrs["shards"])
        assert [r["file"] for r in recorded] == [os.path.basename(s) for s in shards]
        assert [r["index"] for r in recorded] == list(range(count)) and sum(r["rows"] for r in recorded) == 29
        assert recorded[0]["start"] == 0 and all(a["stop"] == b["start"] for a, b in zip(recorded, recorded[1:]))
        assert recorded[-1]["stop"] == 30  # 29 rows and one failure
        for shard, r in zip(shards, recorded):
            with h5py.File(shard, "r") as part:
                own = json.loads(part.attrs["shard"])
                assert (r["start"], r["stop"], r["run_id"]) == (own["start"], own["stop"], part.attrs["run_id"])
                assert f.attrs["inputs_sha256"] == own["inputs_sha256"]  # the one input list they all split
    with vitcore.open_tokens(out) as f:
        summary = f.describe()
        assert [s["state"] for s in summary["shards"]] == ["complete"] * count
        assert f[f.keys[-1]].shape == (16, 32)


def test_merge_refuses_mismatched_overlapping_and_missing_shards(images, tmp_path):
    out = str(tmp_path / "out.h5")
    s = [shard_path(out, i, 3) for i in range(3)]
    for i in range(3):
        vitcore.extract([images], s[i], EXACT, shard=(i, 3))
    with pytest.raises(UsageError, match="missing"):
        merge(out, [s[0], s[2]])
    twin = str(tmp_path / "twin.h5")
    shutil.copy(s[1], twin)
    with pytest.raises(UsageError, match="overlaps"):
        merge(out, [s[0], s[1], twin, s[2]])
    pooled = str(tmp_path / "pooled.h5")
    vitcore.extract([images], pooled, EXACT, shard=(1, 3), pool="mean")
    with pytest.raises(UsageError, match="pooling"):
        merge(out, [s[0], pooled, s[2]])
    other = str(tmp_path / "other.h5")
    vitcore.extract([images / "a"], other, EXACT, shard=(1, 3))
    with pytest.raises(UsageError, match="input"):
        merge(out, [s[0], other, s[2]])
    plain = str(tmp_path / "plain.h5")
    vitcore.extract([images], plain, EXACT)
    with pytest.raises(UsageError, match="not a shard"):
        merge(out, [plain])
    assert not os.path.exists(out)


def test_a_shard_resumes_itself_and_refuses_a_changed_input_list(images, tmp_path):
    out = str(tmp_path / "out.h5")
    first = shard_path(out, 0, 2)
    vitcore.extract([images], first, EXACT, shard=(0, 2))
    again = vitcore.extract([images], first, EXACT, shard=(0, 2))  # the same launch again: nothing to do
    assert again.written == 0 and again.complete
    (images / "a" / "99_new.png").write_bytes((images / "a" / "01.png").read_bytes())
    with pytest.raises(ResumeMismatchError, match="input list"):
        vitcore.extract([images], first, EXACT, shard=(0, 2))


def test_merged_folder_can_be_moved(images, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out.h5"
    shards = [shard_path(str(out), i, 2) for i in range(2)]
    for i in range(2):
        vitcore.extract([images], shards[i], EXACT, shard=(i, 2))
    merge(str(out), shards, virtual=True)  # the views name their shards by relative paths
    expected = _content(out)[1]
    moved = tmp_path / "moved"
    shutil.move(str(work), str(moved))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.MonkeyPatch.context() as patch:  # the working directory as it was, after
        patch.chdir(elsewhere)
        np.testing.assert_array_equal(_content(moved / "out.h5")[1], expected)


def _torchrun(nproc: int, images: Path, out: Path, *extra: str, background: bool = False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "vitcore.cli", "run", str(images), "-o", str(out), *CLI_EXACT, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if background:
        return subprocess.Popen(cmd, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_on_gloo_equals_one_process(images, tmp_path, nproc):
    single = tmp_path / "single.h5"
    vitcore.extract([images], single, EXACT)
    out = tmp_path / "dist.h5"
    done = _torchrun(nproc, images, out, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["rows"] == 29 and summary["shards"] == nproc and summary["written"] == 29
    assert summary["found"] == 30 and [f["path"] for f in summary["failures"]] == ["a/15_broken.png"]
    _assert_same(out, single)
    for rank in range(nproc):
        with h5py.File(shard_path(str(out), rank, nproc), "r") as f:
            record = json.loads(f.attrs["shard"])
            assert (record["index"], record["count"], record["total"]) == (rank, nproc, 30)


def test_a_crashed_rank_fails_the_launch_and_a_rerun_completes_it(images, tmp_path):
    single = tmp_path / "single.h5"
    vitcore.extract([images], single, EXACT)
    out = tmp_path / "dist.h5"
    # A slower run (batch 1, 200 more images) so that rank 1 can be killed mid-way.
    from PIL import Image

    rng = np.random.default_rng(1)
    for i in range(200):
        Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(images / "b" / f"x{i:03d}.png")
    vitcore.extract([images], single, EXACT, overwrite=True)
    launch = _torchrun(2, images, out, "--batch-size", "1", background=True)
    lock = Path(shard_path(str(out), 1, 2) + ".lock")
    deadline = time.time() + 120
    pid = None
    while time.time() < deadline and pid is None:
        time.sleep(0.1)
        try:
            with h5py.File(shard_path(str(out), 1, 2), "r", locking=False) as f:
                if f.attrs["committed"] >= 3:
                    pid = int(lock.read_text().split()[1])
        except (OSError, KeyError, ValueError, IndexError):
            pass
    assert pid is not None, "rank 1 never committed rows"
    os.kill(pid, signal.SIGKILL)
    _, stderr = launch.communicate(timeout=120)
    assert launch.returncode != 0
    assert not out.exists()  # no silent partial merge
    rerun = _torchrun(2, images, out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _assert_same(out, single)


def test_a_virtual_merge_refuses_to_read_through_changed_or_missing_shards(images, tmp_path, cli):
    from vitcore.errors import VitExtractError

    out = str(tmp_path / "out.h5")
    shards = [shard_path(out, i, 3) for i in range(3)]
    for i in range(3):
        vitcore.extract([images], shards[i], EXACT, shard=(i, 3))
    merge(out, shards, virtual=True)
    with pytest.raises(UsageError, match="one of the shards"):
        merge(shards[0], shards, overwrite=True)
    vitcore.extract([images], shards[1], EXACT, shard=(1, 3), overwrite=True, seed=5)  # same rows, new file
    with pytest.raises(VitExtractError, match="changed since the merge"):
        vitcore.open_tokens(out)
    info = json.loads(cli("info", out, "--json").stdout)
    assert [s["state"] for s in info["shards"]] == ["complete", "changed", "complete"] and info["merged"] == "virtual"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(shards[2], elsewhere / os.path.basename(shards[2]))
    os.unlink(shards[2])
    with pytest.MonkeyPatch.context() as patch:  # the working directory as it was, after
        patch.chdir(elsewhere)  # HDF5 would fall back to a same-named file in the working directory
        with pytest.raises(VitExtractError, match="missing|changed"):
            vitcore.open_tokens(out)
    with pytest.raises(ResumeMismatchError, match="virtual view"):
        vitcore.extract([images], out, EXACT, resume=True)


def test_an_empty_shard_is_fine_even_with_overwrite(images, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(images / "a" / "01.png", one / "x.png")
    out = str(tmp_path / "o.h5")
    empty = vitcore.extract([one], shard_path(out, 0, 2), EXACT, shard=(0, 2), overwrite=True)
    full = vitcore.extract([one], shard_path(out, 1, 2), EXACT, shard=(1, 2), overwrite=True)
    assert (empty.rows, full.rows) == (0, 1)
    assert merge(out, [shard_path(out, i, 2) for i in range(2)]).rows == 1


def test_the_file_names_every_device_that_made_its_rows(images, tmp_path):
    from vitcore.store import devices_joined

    assert devices_joined("cuda:0", "cpu", "cuda:0, cpu", "", "cuda:1") == "cuda:0, cpu, cuda:1"
    two = [images / "a" / "01.png", images / "a" / "03.png"]
    out = tmp_path / "out.h5"
    shards = [shard_path(str(out), i, 3) for i in range(3)]
    for i, shard in enumerate(shards):
        vitcore.extract(two, shard, EXACT, shard=(i, 3))
        with h5py.File(shard, "r+") as f:
            f.attrs["device"] = f"cuda:{i}"  # as if each shard had run on its own GPU
    with h5py.File(shards[0], "r") as f:
        assert f.attrs["committed"] == 0  # 3 shards of 2 images: the first holds none
    merge(str(out), shards)
    with h5py.File(out, "r") as f:
        assert f.attrs["device"] == "cuda:1, cuda:2"  # the empty shard's device made no rows
    # Resuming a GPU run on the CPU keeps the GPU's rows, so the file names both.
    single = tmp_path / "single.h5"
    later = images / "a" / "01.png"
    aside = later.rename(tmp_path / "01.png")
    vitcore.extract([images], single, EXACT)
    with h5py.File(single, "r+") as f:
        f.attrs["device"] = "cuda:0"
    nothing_new = vitcore.extract([images], single, EXACT, resume=True)  # writes no rows: no new device
    assert nothing_new.written == 0
    with h5py.File(single, "r") as f:
        assert f.attrs["device"] == "cuda:0"
    aside.rename(later)
    result = vitcore.extract([images], single, EXACT, resume=True)
    assert result.written == 1
    with h5py.File(single, "r") as f:
        assert f.attrs["device"] == "cuda:0, cpu"


_READ_UNDER_A_LIMIT = """
import json, resource, sys
import numpy as np
soft, hard = int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
import vitcore
from vitcore.errors import VitExtractError
try:
    with vitcore.open_tokens(sys.argv[1]) as f:
        rows = np.concatenate([batch for _, batch in f.iter_batches(64)])  # every shard read in one go
        print(json.dumps({"rows": len(rows), "finite": bool(np.isfinite(rows).all()), "sum": float(rows.sum())}))
except VitExtractError as err:
    print(json.dumps({"error": str(err)}))
"""


def test_a_virtual_merge_never_reads_fill_values_for_shards_it_could_not_open(tmp_path):
    """More shards than the open-file limit: the limit is raised as far as the system allows, and
    where that is not enough the read is refused in one line, never NaN rows read as data."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(np.full((20, 20, 3), i * 6, np.uint8)).save(folder / f"{i:02d}.png")
    out = tmp_path / "merged.h5"
    shards = [shard_path(str(out), i, 40) for i in range(40)]
    for i in range(40):
        vitcore.extract([folder], shards[i], EXACT, shard=(i, 40))
    merge(str(out), shards, virtual=True)
    copy = tmp_path / "copy.h5"  # the default merge, under the same low limit: one shard open at a time
    done = subprocess.run([sys.executable, "-c", _CLI_UNDER_A_LIMIT, "30", "merge", "-o", str(copy), *shards],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    with vitcore.open_tokens(copy) as f:
        expected = float(np.stack([f[k] for k in f.keys]).sum())

    def read(soft: int, hard: int) -> dict:
        done = subprocess.run([sys.executable, "-c", _READ_UNDER_A_LIMIT, str(out), str(soft), str(hard)],
                              capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    raised = read(30, 4096)  # a low soft limit is raised: every shard is read
    assert raised == {"rows": 40, "finite": True, "sum": pytest.approx(expected, rel=1e-6)}
    refused = read(30, 30)  # the hard limit is too low: refused, with the way out
    assert "needs 104 open files, but this system allows 30" in refused["error"]
    assert "without --virtual" in refused["error"]

    # The default merge is a copy: plain h5py reads every row under the same limit, and so do
    # `info` and `similar`; the virtual view reads NaN for the shards it could not open, silently,
    # which is why it is not the default.
    def plain(path, soft):
        done = subprocess.run([sys.executable, "-c", _PLAIN_H5PY_UNDER_A_LIMIT, str(path), str(soft)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    assert plain(copy, 30) == {"rows": 40, "nan_rows": 0, "sum": pytest.approx(expected, rel=1e-6)}
    assert plain(out, 30)["nan_rows"] > 0
    for command in (["info", str(copy), "--json"], ["similar", str(copy), "07.png", "-k", "1", "--json"]):
        done = subprocess.run([sys.executable, "-c", _CLI_UNDER_A_LIMIT, "30", *command],
                              capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
        assert done.returncode == 0, done.stderr[-2000:]
        answer = json.loads(done.stdout)
        assert answer["rows"] == 40 if command[0] == "info" else answer[0]["key"] == "07.png"


_PLAIN_H5PY_UNDER_A_LIMIT = """
import json, resource, sys
import h5py, numpy as np
soft = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, soft))
with h5py.File(sys.argv[1], "r") as f:  # plain h5py, as a user's script reads it
    tokens = f["tokens"][:]
nan = np.isnan(tokens).reshape(len(tokens), -1).any(axis=1)
print(json.dumps({"rows": len(tokens), "nan_rows": int(nan.sum()), "sum": float(tokens[~nan].sum())}))
"""

_CLI_UNDER_A_LIMIT = """
import resource, sys
soft = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, soft))
from vitcore.cli.main import main
sys.argv = ["vit-extract", *sys.argv[2:]]
main()
"""



def test_ray_units_are_cut_at_tar_and_row_group_boundaries(tmp_path):
    # --engine ray's units: a tar's members, or a Parquet row group's rows, stay in one unit when
    # they fit; a container larger than a unit is cut in pieces; loose files fill units up.
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vitcore.inputs.discover import discover
    from vitcore.run.shard import take_range, unit_ranges

    def png() -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (9, 99, 199)).save(buffer, "PNG")
        return buffer.getvalue()

    def tar(name: str, members: int) -> None:
        with tarfile.open(tmp_path / name, "w") as t:
            for i in range(members):
                data = png()
                info = tarfile.TarInfo(f"m{i}.png")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))

    tar("a.tar", 3)
    tar("b.tar", 5)
    (tmp_path / "c.png").write_bytes(png())
    (tmp_path / "d.png").write_bytes(png())
    tar("e.tar", 2)
    table = pa.table({"image": [{"bytes": png(), "path": None}] * 4})
    pq.write_table(table, tmp_path / "f.parquet", row_group_size=2)

    found = discover([tmp_path])
    assert len(found.sources) == 16
    ranges = unit_ranges(found, 4)
    # a.tar | b.tar in two pieces | c, d and e.tar together | f.parquet's two row groups together
    assert ranges == [(0, 3), (3, 5), (5, 8), (8, 12), (12, 16)]
    assert unit_ranges(found, 100) == [(0, 16)] and len(unit_ranges(found, 1)) == 16
    for size in range(1, 18):  # whatever the size: contiguous, covering every input once, none too large
        cut = unit_ranges(found, size)
        assert cut[0][0] == 0 and cut[-1][1] == 16 and all(a[1] == b[0] for a, b in zip(cut, cut[1:]))
        assert all(0 < stop - start <= size for start, stop in cut)
    part, record = take_range(found, 1, 5, 3, 5)
    assert [s.key for s in part.sources] == ["b.tar/m0.png", "b.tar/m1.png"] and (record.start, record.stop) == (3, 5)
    assert unit_ranges(discover([tmp_path / "c.png"]), 4) == [(0, 1)]
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(10):
        (loose / f"{i}.png").write_bytes(png())
    assert unit_ranges(discover([loose]), 8) == [(0, 5), (5, 10)]  # shared out evenly, not 8 then 2
