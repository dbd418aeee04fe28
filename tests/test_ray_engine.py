"""--engine ray on a local Ray instance. Ray advertises the machine's own address even when told
127.0.0.1, so every Ray process here runs in a network namespace of its own that has only the
loopback interface (``unshare --net``): no traffic can leave it. Each test runs its Ray part as a
script in such a namespace and compares the files it wrote with a plain run made here.

- the units on Ray equal a plain run, bit for bit in float32, decoded in Ray tasks or in the actors;
- an encoder actor killed mid-run is restarted and its unit done again: every row exactly once;
- a decoding task's worker process killed mid-task: the task is tried again, every row exactly once;
- a driver killed outright, then the same command with --resume: the uninterrupted run's file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

pytest.importorskip("ray")

import vitcore  # noqa: E402
from tests.helpers import SAMPLES  # noqa: E402

EXACT = ["--model", "small", "--dtype", "float32", "--out-dtype", "float32", "--batch-size", "2"]
IN_ACTORS = ["--workers", "0"]  # each actor decodes its own inputs (no Ray tasks)
CLI = [sys.executable, "-m", "vitcore.cli", "run"]


def in_loopback_namespace(script: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``script`` (bash) in a new network namespace with only loopback up; Ray and the script's
    background jobs stopped at its end."""
    body = f"set -e\nip link set lo up\n{script}\n"
    # At its end, whatever way it ends: the script's background jobs (a local S3 endpoint) and Ray stopped.
    wrapped = (f"trap 'kill $(jobs -p) 2>/dev/null || true; {sys.executable} -m ray.scripts.scripts stop --force >/dev/null 2>&1' "
               f"EXIT\n{body}")
    # As root a network namespace alone; otherwise inside a user namespace that maps this user to root.
    unshare = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--net"]
    done = subprocess.run([*unshare, "bash", "-c", wrapped], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    for path in sorted(SAMPLES.iterdir()):
        if path.suffix in (".jpg", ".png"):
            shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def plain(images, tmp_path_factory):
    """The same run without Ray."""
    out = tmp_path_factory.mktemp("plain") / "plain.h5"
    vitcore.extract([images], out, model="small", dtype="float32", out_dtype="float32", batch_size=2, workers=0)
    return _rows(out)


def _rows(path) -> dict:
    with h5py.File(path) as f:
        return dict(zip(f["paths"].asstr()[:], f["tokens"][:]))


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b) and len(a) == 8
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_units_on_ray_equal_a_plain_run(images, plain, tmp_path):
    tasks = " ".join([*CLI, str(images), "-o", "ray.h5", *EXACT, "--engine", "ray", "--unit-size", "3", "--json"])
    actors = " ".join([*CLI, str(images), "-o", "actors.h5", *EXACT, *IN_ACTORS, "--engine", "ray", "--unit-size", "5",
                       "--actors", "2"])
    done = in_loopback_namespace(f"{tasks} 2> tasks.txt\n{actors} --quiet", tmp_path)
    summary = json.loads(done.stdout)  # --json: nothing else on stdout, Ray's words included
    assert summary["written"] == 8 and summary["rows"] == 8 and summary["failures"] == []
    assert summary["decoding"] == "1 encoder actor, each fed by 2 Ray decoding tasks at a time"
    said = (tmp_path / "tasks.txt").read_text().splitlines()  # no Ray log lines: they stay in Ray's log files
    assert said and all(line.startswith("progress: ") for line in said), said
    _same(_rows(tmp_path / "ray.h5"), plain)
    _same(_rows(tmp_path / "actors.h5"), plain)
    assert len(list(tmp_path.glob("ray.shard*-of-00003.h5"))) == 3  # a part per unit, merged


def test_a_decoding_worker_killed_mid_task_is_tried_again(images, plain, tmp_path):
    # Ray names a worker process after the task it runs (ray::decode_range): the first one seen is
    # killed; Ray runs that batch's task again in another worker.
    run = " ".join([*CLI, str(images), "-o", "tasks.h5", *EXACT, "--batch-size", "1", "--workers", "1",
                    "--engine", "ray", "--unit-size", "4", "--progress", "lines", "--progress-every", "0"])
    watch = Path(__file__).resolve().parent.parent / "bench" / "kill_first_decoding_worker.py"
    done = in_loopback_namespace(f"{sys.executable} {watch} > killed.txt &\n{run} 2> progress.txt\nwait", tmp_path)
    assert (tmp_path / "killed.txt").read_text().startswith("KILLED"), done.stderr[-2000:]
    _same(_rows(tmp_path / "tasks.h5"), plain)  # every row once, none lost
    # Progress moves inside a unit (its batches are reported), not only when a unit ends:
    lines = (tmp_path / "progress.txt").read_text().splitlines()
    assert any(line.startswith("progress: ") and "units 0/2" in line and not line.startswith("progress: 0/")
               for line in lines), lines


def test_an_actor_killed_mid_run_is_restarted_and_its_unit_done_again(images, plain, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, threading, time
        import ray
        from vitcore.options import ExtractOptions
        from vitcore.run.ray_engine import extract_on_ray

        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
        killed, seen = [], set()

        def encoder_actors():  # Ray names an actor's process after its class
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{{pid}}/cmdline", "rb") as f:
                        if b"UnitEncoder" in f.read():
                            yield int(pid)
                except OSError:
                    pass

        def kill_when_the_second_part_starts():
            while not os.path.exists("killed.shard00001-of-00004.h5"):
                seen.update(encoder_actors())
                time.sleep(0.05)
            for pid in encoder_actors():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            while True:  # the actor started again
                seen.update(encoder_actors())
                time.sleep(0.05)

        threading.Thread(target=kill_when_the_second_part_starts, daemon=True).start()
        options = ExtractOptions(model="small", dtype="float32", out_dtype="float32", batch_size=1)
        outcome = extract_on_ray([{str(images)!r}], "killed.h5", options, unit_size=2)
        print("KILLED", len(killed), "ACTORS", len(seen), "ROWS", outcome.merged.rows)
    """)
    (tmp_path / "kill.py").write_text(script)
    done = in_loopback_namespace(f"{sys.executable} kill.py", tmp_path)
    line = next(line for line in done.stdout.splitlines() if line.startswith("KILLED"))
    _, killed, _, actors, _, rows = line.split()
    assert int(killed) >= 1 and int(actors) > int(killed) and int(rows) == 8  # a new actor took over
    _same(_rows(tmp_path / "killed.h5"), plain)  # every row once, none lost


def test_a_driver_stopped_or_killed_outright_resumes_to_the_uninterrupted_file(images, plain, tmp_path):
    run = " ".join([*CLI, str(images), "-o", "resumed.h5", *EXACT, "--engine", "ray", "--unit-size", "2", "--quiet"])
    script = textwrap.dedent(f"""
        {run} 2> stopped.txt &
        driver=$!
        until [ -e resumed.shard00001-of-00004.h5 ]; do sleep 0.05; done
        kill -TERM $driver
        code=0; wait $driver || code=$?
        echo "TERM exit $code"
        {run} &
        driver=$!
        until [ -e resumed.shard00002-of-00004.h5 ]; do sleep 0.05; done
        kill -9 $driver
        wait $driver || true
        {sys.executable} -m ray.scripts.scripts stop --force >/dev/null 2>&1
        test ! -e resumed.h5
        code=0; {run} --pool mean 2> other.txt || code=$?
        echo "OTHER SETTINGS exit $code"
        {run} --resume
        {run} --resume --json > again.json
        code=0; {run.replace("--unit-size 2", "--unit-size 3")} --resume 2> cut.txt || code=$?
        echo "OTHER CUT exit $code"
    """)
    done = in_loopback_namespace(script, tmp_path)
    assert "TERM exit 143" in done.stdout  # a clean stop, as a local run's
    stopped = (tmp_path / "stopped.txt").read_text()
    assert "stopped by SIGTERM after" in stopped and "error:" not in stopped and "rerun the same command with --resume" in stopped
    assert "Traceback" not in stopped, stopped
    # Said once, in one line: no second Ray instance started on the way out, none of Ray's lines.
    assert stopped.strip().count("\n") == 0 and "Ray" not in stopped, stopped
    # Parts cut by another --unit-size: --resume refuses, naming the unit size that resumes them.
    assert "OTHER CUT exit 2" in done.stdout
    assert "were cut into 4 units by an earlier run" in (tmp_path / "cut.txt").read_text()
    assert "rerun with --unit-size 2 to resume them" in (tmp_path / "cut.txt").read_text()
    assert "OTHER SETTINGS exit 2" in done.stdout  # leftover parts are never taken for another run's
    assert "the pooling setting differs (file: none; this run: mean)" in (tmp_path / "other.txt").read_text()
    _same(_rows(tmp_path / "resumed.h5"), plain)
    with h5py.File(tmp_path / "resumed.h5") as f:
        assert f.attrs["complete"] and int(f.attrs["committed"]) == 8
    again = json.loads((tmp_path / "again.json").read_text())  # every part complete: nothing to do, said truly
    assert again["written"] == 0 and again["skipped"] == 8 and again["rows"] == 8
    assert again["encoder"] == "small" and again["untrained"] is True and again["token_shape"] == [256, 512]


def test_inputs_and_parts_in_object_storage(images, plain, tmp_path):
    # A local S3 endpoint inside the same loopback-only namespace: the pictures in a bucket, the parts
    # and the merged file written there; a part lost from the bucket is done again by --resume.
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    setup = textwrap.dedent(f"""
        import os, pathlib, socket, time, boto3
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", 5123), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="work")
        for path in sorted(pathlib.Path({str(images)!r}).iterdir()):
            s3.upload_file(str(path), "work", "imgs/" + path.name)
    """)
    (tmp_path / "setup.py").write_text(setup)
    run = " ".join([*CLI, "s3://work/imgs", "-o", "s3://work/out/tokens.h5", *EXACT, "--engine", "ray",
                    "--unit-size", "3"])
    script = textwrap.dedent(f"""
        export AWS_ENDPOINT_URL=http://127.0.0.1:5123 AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
        export AWS_DEFAULT_REGION=us-east-1 VIT_EXTRACT_CACHE_DIR=$PWD/cache
        {sys.executable} -m moto.server -H 127.0.0.1 -p 5123 >/dev/null 2>&1 &
        {sys.executable} setup.py
        {run} --json > first.json
        {sys.executable} -c "import boto3; s3 = boto3.client('s3'); [s3.delete_object(Bucket='work', Key=k) \\
            for k in ('out/tokens.h5', 'out/tokens.shard00001-of-00003.h5')]"
        {run} --resume --json > resumed.json
        {sys.executable} -c "import boto3; s3 = boto3.client('s3'); s3.download_file('work', 'out/tokens.h5', 'got.h5'); \\
            print(sorted(o['Key'] for o in s3.list_objects_v2(Bucket='work', Prefix='out/')['Contents']))"
        find cache -name '*.h5' | sort
    """)
    done = in_loopback_namespace(script, tmp_path)
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["output"] == "s3://work/out/tokens.h5" and first["written"] == 8 and first["rows"] == 8
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["written"] == 3 and resumed["skipped"] == 5 and resumed["rows"] == 8  # only the lost part
    _same(_rows(tmp_path / "got.h5"), plain)
    with h5py.File(tmp_path / "got.h5") as f:  # the merged file names its parts where they are
        assert [s["file"] for s in json.loads(f.attrs["shards"])] == [
            f"s3://work/out/tokens.shard0000{i}-of-00003.h5" for i in range(3)]
    assert "['out/tokens.h5', 'out/tokens.shard00000-of-00003.h5', 'out/tokens.shard00001-of-00003.h5', " \
           "'out/tokens.shard00002-of-00003.h5']" in done.stdout
    assert ".h5" not in done.stdout.split("]")[-1]  # no staged copy left behind once uploaded
