"""Inputs in object storage: a local S3 endpoint (moto's server, on 127.0.0.1 only, started here and
stopped after) holding pictures, tar shards and Parquet. Tokens read from s3:// equal tokens read
from the same files on disk, bit for bit in float32; listing, brace ranges, lists of URLs, a missing
object, a broken member and resume behave as they do for local files."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time

import h5py
import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

import vitcore  # noqa: E402
from tests.helpers import SAMPLES  # noqa: E402
from vitcore.errors import UsageError  # noqa: E402
from vitcore.inputs.remote import public_url  # noqa: E402

BUCKET = "tokens-test"
EXACT = dict(model="small", dtype="float32", out_dtype="float32", workers=0, batch_size=4)
PICTURES = ("astronaut.jpg", "coffee.jpg", "greyscale_camera.png")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(the local folder, the bucket's URL): the same files on disk and in the local S3 endpoint."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(100):  # the server is up when it answers
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        local = tmp_path_factory.mktemp("local")
        _make_files(local)
        import boto3

        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        for path in sorted(local.rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), BUCKET, path.relative_to(local).as_posix())
        yield local, f"s3://{BUCKET}"
    finally:
        server.terminate()
        server.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _make_files(local):
    (local / "imgs" / "sub").mkdir(parents=True)
    for i, name in enumerate(PICTURES):
        shutil.copy(SAMPLES / name, local / "imgs" / ("sub" if i == 2 else "") / name)
    (local / "imgs" / "notes.md").write_text("not a picture")
    (local / "shards").mkdir()
    for n, names in enumerate((PICTURES[:2], PICTURES[2:])):
        with tarfile.open(local / "shards" / f"{n:05d}.tar", "w") as tar:
            for i, name in enumerate(names):
                tar.add(SAMPLES / name, arcname=f"s{n}{i}.{name.rsplit('.', 1)[1]}")
            broken = b"\xff\xd8\xff\xe0 not really a jpeg"
            info = tarfile.TarInfo(f"s{n}9.jpg")
            info.size = len(broken)
            tar.addfile(info, io.BytesIO(broken))
    import pyarrow as pa
    import pyarrow.parquet as pq

    (local / "pq").mkdir()
    table = pa.table({"image": [(SAMPLES / name).read_bytes() for name in PICTURES], "caption": ["a", "b", "c"]})
    pq.write_table(table, local / "pq" / "part.parquet", row_group_size=2)


def _read(path) -> dict:
    with h5py.File(path) as f:
        keys = list(f["paths"].asstr()[:])
        tokens = f["tokens"][:]
        failed = dict(zip(f["failed/paths"].asstr()[:], f["failed/errors"].asstr()[:]))
    return {"rows": dict(zip(keys, tokens)), "failed": failed}


def _same_rows(a: dict, b: dict) -> None:
    assert list(a["rows"]) == list(b["rows"]) and a["rows"]
    for key in a["rows"]:
        assert np.array_equal(a["rows"][key], b["rows"][key]), key  # bit for bit


def test_a_prefix_is_read_as_a_folder_is(store, tmp_path):
    local, bucket = store
    remote = _read(vitcore.extract([f"{bucket}/imgs"], tmp_path / "s3.h5", **EXACT).output)
    here = _read(vitcore.extract([local / "imgs"], tmp_path / "disk.h5", **EXACT).output)
    _same_rows(remote, here)
    assert list(remote["rows"]) == ["astronaut.jpg", "coffee.jpg", "sub/greyscale_camera.png"]
    with h5py.File(tmp_path / "s3.h5") as f:
        assert json.loads(f.attrs["roots"]) == [f"{bucket}/imgs"]  # the prefix, as a folder's path
    with vitcore.open_tokens(tmp_path / "s3.h5") as f, f.open_original("coffee.jpg") as handle:
        assert handle.read() == (SAMPLES / "coffee.jpg").read_bytes()  # show and similar read it back


def test_tar_shards_by_a_brace_range_with_a_broken_member(store, tmp_path):
    local, bucket = store
    remote = _read(vitcore.extract([f"{bucket}/shards/{{00000..00001}}.tar"], tmp_path / "s3.h5", **EXACT).output)
    here = _read(vitcore.extract([local / "shards"], tmp_path / "disk.h5", **EXACT).output)
    _same_rows(remote, here)
    assert set(remote["failed"]) == set(here["failed"]) == {"00000.tar/s09.jpg", "00001.tar/s19.jpg"}
    assert remote["failed"]["00000.tar/s09.jpg"] == here["failed"]["00000.tar/s09.jpg"]


def test_parquet_row_groups_read_from_the_store(store, tmp_path):
    local, bucket = store
    remote = _read(vitcore.extract([f"{bucket}/pq/part.parquet"], tmp_path / "s3.h5", **EXACT).output)
    here = _read(vitcore.extract([local / "pq"], tmp_path / "disk.h5", **EXACT).output)
    _same_rows(remote, here)
    assert len(remote["rows"]) == 3


def test_a_list_of_urls_with_a_missing_object_and_resume(store, tmp_path):
    local, bucket = store
    listed = tmp_path / "list.txt"
    listed.write_text(f"{bucket}/imgs/astronaut.jpg\n{bucket}/imgs/gone.jpg\n")
    first = vitcore.extract(files_from=listed, output=tmp_path / "l.h5", **EXACT)
    assert first.written == 1 and [key for key, _ in first.failures] == ["gone.jpg"]
    assert "FileNotFoundError" in first.failures[0][1]
    listed.write_text(listed.read_text() + f"{bucket}/imgs/coffee.jpg\n")  # more arrive; the run goes on
    again = vitcore.extract(files_from=listed, output=tmp_path / "l.h5", resume=True, **EXACT)
    assert again.skipped == 2 and again.written == 1
    whole = _read(vitcore.extract([f"{bucket}/imgs/astronaut.jpg", f"{bucket}/imgs/coffee.jpg"], tmp_path / "w.h5",
                                  **EXACT).output)
    _same_rows(_read(tmp_path / "l.h5"), whole)


def test_what_is_recorded_of_a_url_holds_no_secret():
    assert public_url("s3://AKIA:SECRET@bucket/a/b.tar") == "s3://bucket/a/b.tar"
    assert public_url("s3://bucket/a#1.jpg") == "s3://bucket/a#1.jpg"  # in a store's URL, # and ? are the key's
    assert public_url("https://u:PASS@host.example/a.jpg?X-Amz-Signature=abc#f") == "https://host.example/a.jpg"
    from vitcore.inputs.remote import scrub

    assert scrub("s3://k:SECRET@b/x?v.jpg and https://h/x.jpg?sig=SECRET.") == "s3://b/x?v.jpg and https://h/x.jpg"


def test_a_missing_backend_names_its_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed
    with pytest.raises(UsageError, match=r"needs the gcs extra: pip install 'vit-extract\[gcs\]'"):
        vitcore.extract(["gs://bucket/images"], tmp_path / "g.h5", **EXACT)


def test_an_output_in_the_store_is_uploaded_whole_and_resumes_after_a_stop(store, tmp_path, monkeypatch):
    from vitcore.errors import Interrupted, OutputExistsError
    from vitcore.run.pipeline import StopFlag

    monkeypatch.setenv("VIT_EXTRACT_CACHE_DIR", str(tmp_path / "cache"))
    local, bucket = store
    url = f"{bucket}/out/tokens.h5"
    stop = StopFlag()

    def stop_after_first_batch(progress):
        if progress.done:
            stop.set()

    with pytest.raises(Interrupted):  # stopped by a signal: the committed rows are uploaded
        vitcore.extract([f"{bucket}/imgs"], url, progress=stop_after_first_batch, stop=stop,
                        **{**EXACT, "batch_size": 2})
    fs, path = _s3()
    partial = tmp_path / "partial.h5"
    fs.get_file(path(url), str(partial))
    assert len(_read(partial)["rows"]) == 2
    with pytest.raises(OutputExistsError, match="already exists; add --resume"):
        vitcore.extract([f"{bucket}/imgs"], url, **EXACT)
    done = vitcore.extract([f"{bucket}/imgs"], url, resume=True, **{**EXACT, "batch_size": 2})
    assert done.output == url and done.skipped == 2 and done.written == 1
    fs.get_file(path(url), str(tmp_path / "whole.h5"))
    _same_rows(_read(tmp_path / "whole.h5"),
               _read(vitcore.extract([local / "imgs"], tmp_path / "disk.h5", **EXACT).output))
    assert not list((tmp_path / "cache" / "staging").rglob("*.h5"))  # a finished run's staging copy is gone
    with pytest.raises(UsageError, match="the bucket .* does not exist"):
        vitcore.extract([f"{bucket}/imgs"], "s3://no-such-bucket-here/t.h5", **EXACT)
    with pytest.raises(UsageError, match="is a prefix"):
        vitcore.extract([f"{bucket}/imgs"], f"{bucket}/imgs/", **EXACT)


def test_info_reads_a_file_in_the_store_in_place(store, tmp_path):
    # `info s3://…` reads the file where it is (range requests), and says what `info` of a local
    # copy says; the other readers refuse a URL in one line; a missing object is said as missing.
    local, bucket = store
    disk = vitcore.extract([local / "imgs"], tmp_path / "disk.h5", **EXACT).output
    fs, path = _s3()
    fs.put_file(str(disk), path(f"{bucket}/info/tokens.h5"))
    cli = [sys.executable, "-m", "vitcore.cli"]
    remote = subprocess.run([*cli, "info", f"{bucket}/info/tokens.h5", "--json"], capture_output=True, text=True)
    assert remote.returncode == 0, remote.stderr
    here = subprocess.run([*cli, "info", str(disk), "--json"], capture_output=True, text=True)
    got, want = json.loads(remote.stdout), json.loads(here.stdout)
    assert got.pop("file") == f"{bucket}/info/tokens.h5" and want.pop("file") == str(disk)
    assert got == want and got["rows"] == 3
    missing = subprocess.run([*cli, "info", f"{bucket}/info/none.h5"], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: {bucket}/info/none.h5 does not exist"
    shown = subprocess.run([*cli, "show", f"{bucket}/info/tokens.h5"], capture_output=True, text=True)
    assert shown.returncode == 2 and "is a URL: this command reads a local file; download it first" in shown.stderr
    secret = subprocess.run([*cli, "info", f"s3://KEY:SECRET@{BUCKET}/info/tokens.h5"], capture_output=True, text=True)
    assert secret.returncode == 2 and "a user or password written into an s3:// URL is not used" in secret.stderr
    assert "SECRET" not in secret.stderr + secret.stdout
    prefix = subprocess.run([*cli, "info", f"{bucket}/info"], capture_output=True, text=True)
    assert prefix.returncode == 2 and "is a prefix (a folder): name the file in it" in prefix.stderr
    assert "Traceback" not in missing.stderr + shown.stderr + secret.stderr + prefix.stderr


def test_keys_with_hash_and_question_marks_are_keys(store, tmp_path, monkeypatch):
    # In an object store's URL, # and ? are characters of the key (S3 allows them), not a fragment
    # or a query: objects differing only after them are different inputs, whether listed, named or
    # in a list; and the output's URL is refused in one line when it names a version or holds credentials.
    monkeypatch.setenv("VIT_EXTRACT_CACHE_DIR", str(tmp_path / "cache"))
    local, bucket = store
    fs, path = _s3()
    names = ["a#1.jpg", "a#2.jpg", "b?v=1.jpg", "b?v=2.jpg"]
    for name, picture in zip(names, PICTURES + PICTURES[:1]):
        fs.put_file(str(SAMPLES / picture), path(f"{bucket}/marks/{name}"))
    listed = vitcore.extract([f"{bucket}/marks/"], tmp_path / "listed.h5", **EXACT)
    named = vitcore.extract([f"{bucket}/marks/{n}" for n in names], tmp_path / "named.h5", **EXACT)
    (tmp_path / "list.txt").write_text("".join(f"{bucket}/marks/{n}\n" for n in names))
    in_list = vitcore.extract(files_from=tmp_path / "list.txt", output=tmp_path / "list.h5", **EXACT)
    for result in (listed, named, in_list):
        assert result.written == 4 and result.failures == [] and result.duplicates_dropped == 0
        assert sorted(_read(result.output)["rows"]) == sorted(names)
    rows = _read(listed.output)["rows"]
    assert not np.array_equal(rows["a#1.jpg"], rows["a#2.jpg"])  # each its own picture
    with pytest.raises(UsageError, match=r"names a version of an object"):
        vitcore.extract([f"{bucket}/marks/a#1.jpg"], f"{bucket}/out/t.h5?versionId=3", **EXACT)
    with pytest.raises(UsageError, match=r"a user or password written into an s3:// URL is not used") as refused:
        vitcore.extract([f"{bucket}/marks/a#1.jpg"], f"s3://KEY:SECRET@{BUCKET}/out/t.h5", **EXACT)
    assert "SECRET" not in str(refused.value)


def _s3():
    import s3fs

    return s3fs.S3FileSystem(), lambda url: url.removeprefix("s3://")


def test_names_that_are_two_things_at_once_are_read_as_written(store, tmp_path):
    import boto3

    local, bucket = store
    s3 = boto3.client("s3")
    picture = (SAMPLES / "coffee.jpg").read_bytes()
    for key in ("odd/both.jpg", "odd/both.jpg/inner.jpg", "odd/{a,b}.jpg"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=picture)
    # An object that is also a prefix (other keys start with its name and a slash): the object.
    both = vitcore.extract([f"{bucket}/odd/both.jpg"], tmp_path / "both.h5", **EXACT)
    assert both.written == 1 and list(_read(both.output)["rows"]) == ["both.jpg"]
    # A name with braces that exists as written is not a range (as on disk).
    literal = vitcore.extract([f"{bucket}/odd/{{a,b}}.jpg"], tmp_path / "braces.h5", **EXACT)
    assert literal.written == 1 and list(_read(literal.output)["rows"]) == ["{a,b}.jpg"]


def test_what_cannot_be_read_is_said_in_one_line_without_secrets(store, tmp_path, monkeypatch):
    local, bucket = store
    with pytest.raises(UsageError, match=r"^input s3://no-such-bucket-here/x/ does not exist"):
        vitcore.extract(["s3://no-such-bucket-here/x/"], tmp_path / "typo.h5", **EXACT)
    listed = tmp_path / "list.txt"
    listed.write_text(f"s3://user:SECRET1@{BUCKET}/imgs/astronaut.jpg\n"  # credentials in the URL itself
                      f"https://user:SECRET2@127.0.0.1:9/gone.jpg?token=SECRET3\n")
    result = vitcore.extract(files_from=listed, output=tmp_path / "l.h5", **EXACT)
    assert [key for key, _ in result.failures] == ["astronaut.jpg", "gone.jpg"]  # (s3fs takes no user in a URL)
    with h5py.File(result.output) as f:
        stored = json.dumps({k: f[k].asstr()[:].tolist() for k in ("paths", "failed/paths", "failed/errors")})
        stored += f.attrs["roots"]
    assert "SECRET" not in stored and "astronaut.jpg" in stored
    assert not any("SECRET" in error for _, error in result.failures)
    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no look for an instance role off this machine
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(UsageError, match=r"cannot read s3://.*credentials.*\(credentials come from"):
            vitcore.extract([f"{bucket}/imgs"], tmp_path / "anon.h5", **EXACT)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
