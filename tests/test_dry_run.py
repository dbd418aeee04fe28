"""`run … --dry-run`: its counts are a real run's rows + failures, its projected size is within 5 %
of the real file's, and it writes nothing."""

import io
import json
import os
import shutil
import tarfile

import pytest

import vitcore
from tests.helpers import SAMPLES, TINY, save_tiny_qwen3vl
from vitcore.run.dry_run import dry_run
from vitcore.run.pipeline import ExtractOptions, StopFlag
from vitcore.errors import Interrupted

FAST = ExtractOptions(model=TINY, dtype="float32", device="cpu", workers=0, batch_size=4)


@pytest.fixture
def mixed(tmp_path):
    """Folders of the sample photos (40 pictures), a broken JPEG, a video and a tar shard of photos."""
    root = tmp_path / "mixed"
    for i in range(5):
        shutil.copytree(SAMPLES, root / f"part{i}", ignore=shutil.ignore_patterns("*.md"))
    (root / "part0" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "part1" / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    with tarfile.open(root / "shard.tar", "w") as tar:
        for picture in sorted(SAMPLES.glob("*.jpg"))[:3]:
            data = picture.read_bytes()
            info = tarfile.TarInfo(f"sample{picture.stem}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return root


def _within(projected: int, real: int, share: float = 0.05) -> bool:
    return abs(projected - real) <= share * real


@pytest.mark.parametrize("overrides", [{}, {"compression": "zstd", "out_dtype": "bfloat16", "layers": (-2,)},
                                       {"pool": "mean"}])
def test_counts_are_a_real_runs_rows_and_failures_and_the_size_is_within_5_percent(mixed, tmp_path, overrides):
    out = tmp_path / "out.h5"
    planned = dry_run([mixed, mixed / "shard.tar"], out, FAST, **overrides)
    assert not out.exists() and not list(tmp_path.glob("out.h5*"))  # nothing written, no lock left
    real = vitcore.extract([mixed, mixed / "shard.tar"], out, FAST, **overrides)
    assert planned.to_read == real.rows + len(real.failures) == 44
    assert planned.inputs == {"image files": 41, "tar members": 3}
    # counted as a run counts them (a script reads the same fields, of the same shape, from both)
    assert planned.passed_over == real.passed_over and "mp4" in planned.passed_over
    assert planned.entries_passed_over == real.entries_passed_over
    # the clip is said once, as a clip, in the dry run and in the run's summary alike
    for notes in (planned.passed_over_notes, real.warnings):
        assert [n for n in notes if "mp4" in n or "clip" in n] == [
            "1 video clip passed over (mp4 1): clips are read by the Qwen-VL families only (--weights a Qwen-VL "
            "checkpoint)"], notes
    assert planned.tokens_per_image["tokens"] == (16 if overrides.get("pool", "none") == "none" else 1)
    assert _within(planned.projected_bytes, out.stat().st_size), (planned.projected_bytes, out.stat().st_size)
    assert planned.estimated_seconds > 0 and planned.calibration_images == 8


def test_native_resolution_counts_tokens_from_the_headers(tmp_path, photos):
    checkpoint = tmp_path / "qwen3vl"
    save_tiny_qwen3vl(checkpoint)
    out = tmp_path / "qwen.h5"
    options = ExtractOptions(weights=str(checkpoint), dtype="float32", device="cpu", workers=0, batch_size=4,
                             features=("deepstack",))
    planned = dry_run([photos], out, options)
    real = vitcore.extract([photos], out, options)
    with vitcore.open_tokens(out) as f:
        stored = [len(f[key]) for key in f.keys]
    assert planned.tokens_counted_from == "8 image headers (all)"
    assert planned.tokens_per_image["tokens"] == pytest.approx(sum(stored) / len(stored))
    assert planned.tokens_per_image["features/deepstack_0"] == planned.tokens_per_image["tokens"]
    assert planned.to_read == real.rows + len(real.failures)
    assert _within(planned.projected_bytes, out.stat().st_size), (planned.projected_bytes, out.stat().st_size)


def test_with_resume_it_counts_what_is_left_and_leaves_the_file_as_it_was(photos, tmp_path):
    out = tmp_path / "part.h5"
    stop = StopFlag()
    with pytest.raises(Interrupted):
        vitcore.extract([photos], out, FAST, stop=stop, progress=lambda p: p.done >= 4 and stop.set())
    before = (out.read_bytes(), os.stat(out).st_mtime_ns)
    planned = dry_run([photos], out, FAST, resume=True)
    assert (out.read_bytes(), os.stat(out).st_mtime_ns) == before
    assert planned.already_done == 4 and planned.to_read == 4
    result = vitcore.extract([photos], out, FAST, resume=True)
    assert result.written == planned.to_read
    assert _within(planned.projected_bytes, out.stat().st_size), (planned.projected_bytes, out.stat().st_size)


def test_it_says_when_the_disk_has_less_room_than_the_file_would_still_take(photos, tmp_path, monkeypatch):
    import vitcore.run.dry_run as module

    roomy = dry_run([photos], tmp_path / "t.h5", FAST)
    assert not [n for n in roomy.notes if "free" in n]
    left = roomy.projected_bytes + module.SPACE_MARGIN // 2  # room for the file, not for the writer's margin too
    monkeypatch.setattr(module, "free_bytes", lambda folder: left)
    tight = dry_run([photos], tmp_path / "t.h5", FAST)
    (note,) = [n for n in tight.notes if "free" in n]
    assert note.startswith(f"the file would take {module.shown_size(tight.projected_bytes)} more but {tmp_path} has "
                           f"{module.shown_size(left)} free") and "--resume" in note


def test_the_cli_dry_run_refuses_what_a_run_refuses_and_says_the_plan(cli, photos, tmp_path):
    out = tmp_path / "out.h5"
    (photos / "README.md").write_text("not a picture")
    shown = cli("run", photos, "-o", out, "--model", TINY, "--dry-run", "--workers", "0")
    assert shown.exit_code == 0, shown.output
    assert "would read" in shown.output and "8 inputs (8 image files)" in shown.output
    assert "projected" in shown.output and not out.exists()
    as_json = json.loads(cli("run", photos, "-o", out, "--model", TINY, "--dry-run", "--json").output)
    assert as_json["to_read"] == 8 and as_json["projected_bytes"] > 0 and not out.exists()
    ran = json.loads(cli("run", photos, "-o", tmp_path / "ran.h5", "--model", TINY, "--json", "-q").output)
    for name in ("passed_over", "entries_passed_over"):  # one shape for a script reading either
        assert as_json[name] == ran[name], (name, as_json[name], ran[name])
    assert as_json["passed_over"] == {"md": 1}
    for name in ("weights", "untrained", "encoder", "compute_dtype", "batch_size", "workers"):  # one meaning each
        assert as_json[name] == ran[name], (name, as_json[name], ran[name])
    assert as_json["untrained"] is True and "UNTRAINED" in shown.output
    again = json.loads(cli("run", photos, "-o", tmp_path / "ran.h5", "--model", TINY, "--resume", "--dry-run",
                           "--json").output)  # nothing left: no batch, as a run that has nothing left says
    assert again["to_read"] == 0 and again["batch_size"] is None and again["workers"] is None
    on_ray = json.loads(cli("run", photos, "-o", out, "--model", TINY, "--dry-run", "--json", "--engine", "ray",
                            "--unit-size", "3").output)  # the units counted; Ray itself not needed to say so
    assert "--engine ray: 3 units of at most 3 inputs" in " ".join(on_ray["notes"]) and not out.exists()
    assert not list(tmp_path.glob("out.shard*"))
    out.write_bytes(b"")  # an existing output: the run would refuse it, and so does the dry run
    refused = cli("run", photos, "-o", out, "--model", TINY, "--dry-run")
    assert refused.exit_code != 0 and "--overwrite" in refused.output
    assert cli("run", tmp_path / "nothing-here", "-o", tmp_path / "x.h5", "--dry-run").exit_code != 0


def test_it_calibrates_past_inputs_that_do_not_decode(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(8):
        (folder / f"0{i}.jpg").write_bytes(b"")  # the first eight in order: empty files
    for picture in sorted(SAMPLES.glob("*.jpg"))[:3]:
        shutil.copy(picture, folder / picture.name)
    out = tmp_path / "out.h5"
    planned = dry_run([folder], out, FAST)
    real = vitcore.extract([folder], out, FAST)
    assert planned.to_read == real.rows + len(real.failures) == 11
    assert planned.calibration_images == 3 and planned.calibration_failures == 8
    assert _within(planned.projected_bytes, out.stat().st_size), (planned.projected_bytes, out.stat().st_size)


def test_bytes_per_image_when_the_calibration_holds_every_input(photos, tmp_path):
    planned = dry_run([photos], tmp_path / "out.h5", FAST)  # 8 inputs: all in the calibration batch
    assert planned.calibration_images == 8 and planned.bytes_per_image > 16 * 32 * 2
