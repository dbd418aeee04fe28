"""The command line end to end: the main job on sample_images, every dataset and attribute, exit codes."""

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
from vitcore.run.pipeline import ExtractOptions
from tests.helpers import SAMPLES, TINY, folder_of_copies, sigint_as_default, wait_for_committed
from vitcore.errors import VitExtractError

ROOT_ATTRS = {
    "schema_version", "vit_extract_version", "created", "encoder", "weights", "preprocessing", "pooling",
    "projector", "compute_dtype", "device", "out_dtype", "roots", "committed", "complete",
}


def test_run_on_sample_images_writes_the_documented_schema(cli, tmp_path):
    out = tmp_path / "tokens.h5"
    result = cli("run", SAMPLES, "-o", out, "--model", TINY, "--workers", "2", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert "UNTRAINED" in result.stdout and "8 images" in result.stdout
    images = sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".jpg", ".png"))
    with h5py.File(out, "r") as f:
        assert ROOT_ATTRS <= set(f.attrs)
        assert f.attrs["committed"] == 8 and f.attrs["complete"] and f.attrs["schema_version"] == 1
        assert list(f["paths"].asstr()[:]) == images
        assert f["tokens"].shape == (8, 16, 32) and f["tokens"].dtype == np.float16
        assert f["tokens"].chunks == (1, 16, 32) and f["tokens"].compression is None
        assert f["mean"].shape == (8, 32)
        np.testing.assert_allclose(f["mean"][:], f["tokens"][:].astype(np.float32).mean(1), atol=2e-3)
        assert json.loads(f.attrs["roots"]) == [str(SAMPLES)]
        assert list(f["root_index"][:]) == [0] * 8
        sizes = {k: tuple(s) for k, s in zip(f["paths"].asstr()[:], f["image_size"][:])}
        assert sizes["coffee.jpg"] == (600, 400) and sizes["astronaut.jpg"] == (512, 512)
        assert f["failed/paths"].shape == (0,) and f["failed/errors"].shape == (0,)
        assert json.loads(f.attrs["encoder"])["dim"] == 32
        assert json.loads(f.attrs["weights"]) == {"source": "untrained", "seed": 0, "path": None, "sha256": None}
        prep = json.loads(f.attrs["preprocessing"])
        assert (prep["resize"], prep["decode"], prep["image_size"]) == ("squash", "draft", 56)
        assert prep["interpolation"] == "bicubic (Pillow, antialiased)" and prep["draft_margin"] == 2
        assert prep["background"] == [255, 255, 255] and prep["exif_orientation"] == "applied"
        assert prep["mean"] == [0.485, 0.456, 0.406] and prep["std"] == [0.229, 0.224, 0.225]
        assert f.attrs["pooling"] == "none" and f.attrs["projector"] == "null"
        assert f.attrs["compute_dtype"] == "float32" and f.attrs["device"] == "cpu"
        assert f.attrs["out_dtype"] == "float16"
        # The rows are the encoder's own output for each picture (the library's path, float32), in float16.
        direct = vitcore.extract([SAMPLES], tmp_path / "direct.h5", model=TINY, dtype="float32", out_dtype="float32",
                                 workers=0)
        with h5py.File(direct.output, "r") as g:
            np.testing.assert_allclose(f["tokens"][:].astype(np.float32), g["tokens"][:], rtol=1e-3, atol=1e-3)


def test_json_summary_is_the_only_stdout_and_strict_fails_on_failures(cli, photos, tmp_path):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "t.h5"
    result = cli("run", photos, "-o", out, "--model", TINY, "--json", "--strict", "--workers", "0", "--dtype", "float32")
    assert result.exit_code == 3
    summary = json.loads(result.stdout)
    assert summary["rows"] == 8 and summary["complete"] is True
    assert [f["path"] for f in summary["failures"]] == ["broken.jpg"]
    assert summary["workers"] == 0 and summary["batch_size"] == 8 and summary["compute_dtype"] == "float32"
    with h5py.File(out, "r") as f:  # the failure record: key, reason and root
        assert list(f["failed/paths"].asstr()[:]) == ["broken.jpg"] and list(f["failed/root_index"][:]) == [0]
        assert json.loads(f.attrs["roots"])[0] == str(photos) and "broken.jpg" not in list(f["paths"].asstr()[:])
    info = json.loads(cli("info", out, "--json").stdout)
    assert info["rows"] == 8 and info["failed"] == 1 and info["token_shape"] == [16, 32]
    assert info["datasets"]["tokens"] == {"shape": [8, 16, 32], "dtype": "float16"}
    table = cli("info", out).stdout
    assert "broken.jpg" in table and "UNTRAINED" in table and "16×32" in table


def test_refuses_to_overwrite_and_explains(cli, photos, tmp_path):
    out = tmp_path / "t.h5"
    out.write_bytes(b"keep me")
    result = cli("run", photos, "-o", out, "--model", TINY)
    assert result.exit_code == 2
    assert "already exists and is not a vit-extract output" in result.stderr and result.stdout == ""
    assert "--resume" not in result.stderr  # somebody else's file: not one to continue
    assert out.read_bytes() == b"keep me"
    made = tmp_path / "made.h5"
    assert cli("run", photos, "-o", made, "--model", TINY, "-q").exit_code == 0
    result = cli("run", photos, "-o", made, "--model", TINY)
    assert result.exit_code == 2 and "already exists; add --resume to continue it" in result.stderr


def test_odd_list_lines_are_explained_in_the_run_and_the_dry_run(cli, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(photos)
    (tmp_path / "list.txt").write_text("# pictures for the demo\ncoffee.jpg\nrocket.jpg  \n")
    for extra in (["--dry-run"], []):
        result = cli("run", "--files-from", tmp_path / "list.txt", "-o", tmp_path / "l.h5", "--model", TINY,
                     "--json", *extra)
        assert result.exit_code == 0, result.output
        said = json.loads(result.stdout)["notes" if extra else "warnings"]
        assert any(n.startswith("2 listed paths name no file ('# pictures for the demo', 'rocket.jpg  ')")
                   for n in said), said
    assert len(json.loads(result.stdout)["failures"]) == 2


def test_resume_through_the_cli_and_mismatch_message(cli, photos, tmp_path):
    out = tmp_path / "t.h5"
    assert cli("run", photos / "coffee.jpg", "-o", out, "--model", TINY, "-q").exit_code == 0
    result = cli("run", photos, "-o", out, "--model", TINY, "--resume", "--json")
    summary = json.loads(result.stdout)
    assert summary["written"] == 7 and summary["skipped"] == 1 and summary["rows"] == 8  # the same file, however named
    done = json.loads(cli("run", photos, "-o", out, "--model", TINY, "--resume", "--json", "--batch-size", "3").stdout)
    assert done["written"] == 0 and done["batch_size"] is None and done["workers"] is None  # nothing ran
    table = cli("run", photos / "rocket.jpg", "-o", tmp_path / "one.h5", "--model", TINY, "--batch-size", "3",
                "--workers", "0").stdout
    assert "batch 3, 0 decoding workers" in table
    refused = cli("run", photos, "-o", out, "--model", TINY, "--resume", "--pool", "mean")
    assert refused.exit_code == 2 and "pooling setting differs" in refused.stderr  # a settings refusal, like the rest
    alone = cli("run", photos, "-o", out, "--model", TINY, "--retry-failed")
    assert alone.exit_code == 2 and alone.stderr.count("\n") == 1 and "goes with --resume" in alone.stderr
    retried = cli("run", photos, "-o", out, "--model", TINY, "--resume", "--retry-failed", "--json")
    assert json.loads(retried.stdout)["skipped"] == 8  # nothing had failed: nothing to retry


def test_files_from_stdin_and_bad_inputs(cli, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(photos)
    out = tmp_path / "t.h5"
    result = cli("run", "--files-from", "-", "-o", out, "--model", TINY, "--json", input="rocket.jpg\n\nchelsea.jpg\nmissing.jpg\n")
    summary = json.loads(result.stdout)
    assert summary["rows"] == 2 and [f["path"] for f in summary["failures"]] == ["missing.jpg"]
    with h5py.File(out, "r") as f:
        assert list(f["paths"].asstr()[:]) == ["chelsea.jpg", "rocket.jpg"]
        assert json.loads(f.attrs["roots"]) == [str(photos)]
    for args, words in [
        (["run", "nowhere", "-o", tmp_path / "x.h5"], "does not exist"),
        (["run", photos, "-o", tmp_path / "x.h5", "--model", "giant"], "unknown model"),
        (["run", photos, "-o", tmp_path / "x.h5", "--model", TINY, "--layer", "5"], "out of range"),
        (["run", "-o", tmp_path / "x.h5"], "no inputs"),
        (["run", photos, "-o", tmp_path / "x.h5", "--batch-size", "0"], "at least 1"),
        (["run", photos, "-o", tmp_path / "x.h5", "--device", "tpu"], "device"),
    ]:
        bad = cli(*args)
        assert bad.exit_code == 2 and words in bad.stderr, (args, bad.stderr)  # usage errors (README's table)
        assert "Traceback" not in bad.output


def test_negative_layer_option_and_init_weights_round_trip(cli, photos, tmp_path):
    weights = tmp_path / "w.safetensors"
    made = cli("init-weights", "--model", TINY, "--seed", "4", "-o", weights)
    assert made.exit_code == 0 and weights.exists()
    assert cli("init-weights", "--model", TINY, "-o", weights).exit_code == 2  # exists
    out = tmp_path / "t.h5"
    result = cli("run", photos, "-o", out, "--weights", weights, "--layer", "-2", "--pool", "mean", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["untrained"] is True  # init-weights wrote a random initialisation
    with h5py.File(out, "r") as f:
        record = json.loads(f.attrs["weights"])
        assert record["source"] == "untrained file" and record["seed"] == 4 and len(record["sha256"]) == 64
        assert record["path"] == str(weights.resolve())
        assert f["tokens"].shape == (8, 32) and f["layers/-2"].shape == (8, 32)
    seeded = tmp_path / "s.h5"
    cli("run", photos, "-o", seeded, "--model", TINY, "--seed", "4", "--pool", "mean", "-q")
    with h5py.File(out, "r") as a, h5py.File(seeded, "r") as b:
        np.testing.assert_array_equal(a["tokens"][:], b["tokens"][:])  # the file holds seed 4's encoder


def test_models_lists_the_presets(cli):
    rows = json.loads(cli("models", "--json").stdout)
    assert [r["name"] for r in rows] == ["small", "base", "large"]
    assert all(r["tokens_per_image"] == 256 for r in rows)
    assert "302.9M" in cli("models").stdout


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["merge", "--help"], ["models"]])
def test_help_does_not_import_torch(args):
    """--help, and a command that needs no model, answer without importing torch."""
    code = ("import sys\nfrom vitcore.cli.main import main\nsys.argv = ['vit-extract', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as done:\n    assert not done.code, done.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("ok"), done.stderr[-2000:]
    assert "Usage" in done.stdout or args == ["models"]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_one_signal_stops_cleanly_and_leaves_a_resumable_file(tmp_path, sig, code):
    folder = folder_of_copies(tmp_path / "many", 150)
    out = tmp_path / "t.h5"
    cmd = [sys.executable, "-m", "vitcore.cli", "run", str(folder), "-o", str(out), "--model", TINY,
           "--batch-size", "2", "--workers", "1", "--quiet"]
    # Its own process group, signalled as a whole, as timeout, Slurm and a terminal's Ctrl-C do.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
                            start_new_session=True, preexec_fn=sigint_as_default)
    wait_for_committed(out, 3)
    os.killpg(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)  # a hang guard; how fast it stops is bench/ (stop_latency.py)
    assert proc.returncode == code, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert f"stopped by {sig.name} after" in stderr and "error" not in stderr  # asked for: not said as an error
    # said at once, even with --quiet (the user acted): the batch in flight may take seconds on a CPU
    assert stderr.index(f"stopping ({sig.name}): committing what is done first") < \
        stderr.index(f"stopped by {sig.name} after")
    assert stderr.count("stopping (") == 1
    assert ("Ctrl-C again stops at once" in stderr) == (sig == signal.SIGINT)
    with h5py.File(out, "r") as f:
        committed = f.attrs["committed"]
        assert 3 <= committed < 150 and not f.attrs["complete"]
        assert np.isfinite(f["tokens"][:committed]).all()
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    with h5py.File(out, "r") as f:
        keys = list(f["paths"].asstr()[:])
        assert f.attrs["complete"] and keys == sorted(os.listdir(folder))


def test_a_run_that_inherited_sigint_ignored_keeps_ignoring_it(tmp_path):
    # `vit-extract run … &` from a script: the shell starts it with SIGINT ignored, so a Ctrl-C meant
    # for the script's foreground job must not stop it. SIGTERM still stops it.
    folder = folder_of_copies(tmp_path / "many", 40)
    out = tmp_path / "t.h5"
    cmd = [sys.executable, "-m", "vitcore.cli", "run", str(folder), "-o", str(out), "--model", TINY,
           "--batch-size", "2", "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    wait_for_committed(out, 2)  # the run is in its loop
    for _ in range(3):
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.2)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"] and int(f.attrs["committed"]) == 40


def test_messages_are_printed_literally_and_json_mode_reports_errors_as_json(cli, photos, tmp_path):
    result = cli("run", "no[red]pe[/]", "-o", tmp_path / "x.h5", "--json")
    assert result.exit_code == 2 and "no[red]pe[/]" in result.stderr
    assert json.loads(result.stdout) == {"error": "input no[red]pe[/] does not exist", "exit_code": 2}
    bad = cli("init-weights", "--model", TINY, "-o", tmp_path / "missing" / "w.safetensors")
    assert bad.exit_code == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.output


def test_info_output_is_not_cut_when_piped(cli, photos, tmp_path):
    weights = tmp_path / ("w" * 90 + ".safetensors")  # a long path
    cli("init-weights", "--model", TINY, "-o", weights)
    out = tmp_path / "t.h5"
    cli("run", photos, "-o", out, "--weights", weights, "-q")
    digest = json.loads(cli("info", out, "--json").stdout)["weights"]["sha256"]
    table = cli("info", out).stdout
    assert digest in table and str(weights) in table


def test_cli_choices_are_the_library_choices():
    from vitcore.cli import main
    from vitcore import choices
    from vitcore.system.device import DTYPES

    pairs = [(main.Pool, choices.POOLING_MODES), (main.Resize, choices.RESIZE_MODES),
             (main.Decode, choices.DECODE_MODES), (main.Dtype, choices.DTYPE_CHOICES),
             (main.OutDtype, choices.OUT_DTYPES)]
    for enum, values in pairs:
        assert tuple(member.value for member in enum) == values, enum
        assert all(isinstance(member, str) for member in enum)
    assert tuple(DTYPES) == choices.DTYPE_CHOICES[1:]


def test_an_invalid_choice_is_a_usage_error(cli, photos, tmp_path):
    result = cli("run", photos, "-o", tmp_path / "t.h5", "--pool", "median")
    assert result.exit_code == 2 and "median" in result.output and not (tmp_path / "t.h5").exists()


def test_run_help_groups_the_options_into_panels(cli):
    text = cli("run", "--help").stdout
    for panel in ("Inputs", "Encoder", "Compute", "Output", "Display"):
        assert panel in text
    for option in ("--files-from", "--ext", "--decode", "--model", "--weights", "--seed", "--pool",
                   "--project-dim", "--layer", "--resize", "--resolution", "--features", "--batch-size",
                   "--workers", "--device", "--dtype", "--compile", "--output", "--out-dtype", "--resume",
                   "--retry-failed", "--overwrite", "--shard", "--quiet", "--json", "--strict"):
        assert option in text, option


def test_building_the_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "import vitcore.cli.main\n"
        "for args in (['--help'], ['run', '--help'], ['models', '--help']):\n"
        "    result = CliRunner().invoke(vitcore.cli.main.app, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_models_lists_every_other_family_from_the_registry(cli, monkeypatch):
    import vitcore.encoders.registry

    monkeypatch.setattr(vitcore.encoders.registry, "listing", lambda: [
        ("seed", "the seed encoders"), ("qwen3-vl", "a [bold]Qwen3-VL[/] vision tower"), ("other", "one more")])
    text = cli("models").stdout
    assert "qwen3-vl: a [bold]Qwen3-VL[/] vision tower" in text and "other: one more" in text
    assert "seed:" not in text and "302.9M" in text
    assert [r["name"] for r in json.loads(cli("models", "--json").stdout)] == ["small", "base", "large"]


@pytest.mark.parametrize("args", [["run", "sample_images", "--pool", "maen"], ["run", "sample_images", "--batch-size", "0"],
                                  ["run", "sample_images", "--no-such-option"], ["info"]])
def test_option_parsing_errors_are_one_line_and_json_with_json(args):
    """The console script, as users run it: errors found while parsing options are one line on
    stderr, exit 2, and with --json also {"error", "exit_code"} on stdout."""
    import subprocess
    import sys

    project = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "vitcore.cli", *args, "--json"], cwd=project, capture_output=True, text=True,
                          timeout=60)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    record = json.loads(done.stdout)
    assert record["exit_code"] == 2 and record["error"] in lines[0] and "Value error" not in record["error"]


def test_small_things_said_right(photos, tmp_path, cli):
    """init-weights honours the umask; a resume says how many failures earlier runs recorded;
    a picture too large for memory says so; a second Ctrl-C still ends with a line."""
    from vitcore.imaging.loader import describe_error

    previous = os.umask(0o022)
    try:
        assert cli("init-weights", "-o", tmp_path / "w.safetensors", "--model", TINY).exit_code == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out.h5"
    assert cli("run", photos, "-o", out, "--model", TINY, "--workers", "0").exit_code == 0
    again = cli("run", photos, "-o", out, "--model", TINY, "--workers", "0", "--resume")
    assert "0 this run; 1 recorded by earlier runs" in again.stdout
    assert describe_error(MemoryError()) == "MemoryError: not enough memory to decode and resize this picture"
    def run_failing(failure: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", "import vitcore.run.pipeline as p\n"
             f"def stop(*a, **k): raise {failure}\n"
             "p.extract = stop\nimport sys\nfrom vitcore.cli.main import main\n"
             f"sys.argv = ['vit-extract', 'run', {str(photos)!r}, '-o', {str(tmp_path / 'x.h5')!r}, *{extra!r}]\nmain()"],
            capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)

    interrupted = run_failing("KeyboardInterrupt")
    assert interrupted.returncode == 130 and "interrupted at once" in interrupted.stderr, interrupted.stderr[-500:]
    as_json = run_failing("KeyboardInterrupt", "--json")  # --json: a record on stdout, whatever the stop
    assert json.loads(as_json.stdout)["exit_code"] == 130
    fault = run_failing("ZeroDivisionError('a fault of ours')", "--json")  # a bug: its traceback, and a record
    assert fault.returncode == 1 and "Traceback" in fault.stderr
    assert json.loads(fault.stdout) == {"error": "internal error: ZeroDivisionError: a fault of ours", "exit_code": 1}


@pytest.mark.parametrize("args", [["/no/such/folder"], ["sample_images", "-o", "EXISTS"], ["sample_images", "--shard", "5/2"],
                                  ["sample_images", "--features", "deepstack"], ["sample_images", "-o", "LONG"],
                                  ["sample_images", "-o", "READ_ONLY"], ["sample_images", "-o", "UNDER_A_FILE"],
                                  ["sample_images", "--quiet", "--progress", "lines"]])
def test_usage_errors_and_refused_outputs_come_before_torch_is_loaded(tmp_path, args):
    """A refusal is reported at once: options, output and inputs are checked before torch loads."""
    exists = tmp_path / "exists.h5"
    exists.write_bytes(b"")
    long = tmp_path / ("x" * 248 + ".h5")  # fits alone, not with .creating beside it
    read_only = tmp_path / "ro"
    if "READ_ONLY" in args:
        read_only.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)], capture_output=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a read-only file system here: {mounted.stderr.decode().strip()}")
    under_a_file = exists / "t.h5"  # its "folder" is a file
    args = [{"EXISTS": str(exists), "LONG": str(long), "READ_ONLY": str(read_only / "t.h5"),
             "UNDER_A_FILE": str(under_a_file)}.get(a, a) for a in args]
    code = ("import sys\nfrom vitcore.cli.main import main\nsys.argv = ['vit-extract', 'run', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as stop:\n    print('exit', stop.code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    if "READ_ONLY" in str(args) or read_only.is_dir():
        subprocess.run(["umount", str(read_only)], capture_output=True)
    assert done.stdout.split() == ["exit", "2", "False"], (done.stdout, done.stderr)
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
    if long.name in str(args):
        assert "is too long" in done.stderr and "shorten it by 5 bytes" in done.stderr
    if read_only.is_dir():
        assert "read-only file system" in done.stderr
    if str(under_a_file) in args:
        assert f"{exists} is a file, not a folder" in done.stderr
    if "--quiet" in args:
        assert "drop one of them" in done.stderr


def test_progress_goes_to_a_log_as_plain_lines_and_not_with_quiet(tmp_path):
    """stderr redirected to a file (a batch job's log): a plain line every --progress-every seconds
    and one at the end; none with --quiet or --progress none."""
    base = [sys.executable, "-m", "vitcore.cli", "run", str(SAMPLES), "--model", TINY, "--workers", "0",
            "--batch-size", "1", "--dtype", "float32", "--progress-every", "0"]
    logs = {}
    for name, extra in (("lines", []), ("quiet", ["--quiet"]), ("none", ["--progress", "none"])):
        log = tmp_path / f"{name}.err"
        with open(log, "w") as stderr:
            done = subprocess.run([*base, "-o", str(tmp_path / f"{name}.h5"), *extra], stderr=stderr,
                                  stdout=subprocess.DEVNULL, timeout=300)
        assert done.returncode == 0, log.read_text()
        logs[name] = log.read_text().splitlines()
    lines = logs["lines"]
    assert len(lines) >= 2 and all(line.startswith("progress: ") for line in lines), lines
    assert lines[-1].startswith("progress: 8/8 images (100 %)") and lines[-1].endswith("0 failed")
    assert "\x1b" not in "".join(lines)  # no terminal control codes in a log
    assert logs["quiet"] == [] and logs["none"] == []


def test_a_missing_dependency_is_one_line_not_a_traceback(tmp_path):
    """Installed without torch (the README has users install it themselves): a run says so in one
    line, as JSON too with --json; commands that need no torch still work."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ModuleNotFoundError(f\"No module named '{name}'\", name=name)\n"
        "sys.meta_path.insert(0, NoTorch())\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    run = [sys.executable, "-m", "vitcore.cli", "run", str(SAMPLES), "-o", str(tmp_path / "t.h5"), "--model", TINY]
    done = subprocess.run([*run, "--json"], capture_output=True, text=True, env=env, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "torch is not installed" in lines[0] and "Traceback" not in done.stderr
    assert json.loads(done.stdout) == {"error": lines[0].removeprefix("error: "), "exit_code": 1}
    models = subprocess.run([sys.executable, "-m", "vitcore.cli", "models"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert models.returncode == 0 and "small" in models.stdout, models.stderr


def test_piped_summaries_have_no_trailing_padding(cli, photos, tmp_path):
    """Off a terminal (a file, a pipe) the summary, info and models lines end at their text."""
    out = tmp_path / "t.h5"
    outputs = [cli("run", photos, "-o", out, "--model", TINY, "--workers", "0").stdout, cli("info", out).stdout,
               cli("models").stdout]
    for text in outputs:
        assert text.strip() and [line for line in text.splitlines() if line != line.rstrip()] == [], text


@pytest.mark.parametrize("command", ["", "run", "info", "models", "init-weights", "show", "similar", "index", "merge"])
def test_help_reads_as_a_person_writes_it(cli, command):
    """No Python types in the help: flags stand alone, values are named (FILE, N, K, LIST)."""
    result = cli(*([command] if command else []), "--help")
    assert result.exit_code == 0
    for typed in ("<bool>", "<list[", "<str>", "<int range>", "<int>", "<float>", "<float range>", "<path>", "<file>"):
        assert typed not in result.stdout, (typed, result.stdout)


def test_layer_takes_repeats_and_commas(cli, photos, tmp_path):
    out = tmp_path / "t.h5"
    result = cli("run", photos, "-o", out, "--model", TINY, "--layer", "-2,-1", "--layer", "0", "-q", "--workers", "0")
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as f:
        assert sorted(f["layers"]) == ["-1", "-2", "0"]
    bad = cli("run", photos, "-o", tmp_path / "u.h5", "--model", TINY, "--layer", "-2,x")
    assert bad.exit_code == 2 and "'x' is not a block number" in bad.output


def test_what_was_passed_over_or_left_empty_is_counted_with_reasons(cli, photos, tmp_path):
    """Files skipped by extension are counted by extension; an empty file and a HEIC picture fail
    with their own reason, not Pillow's bare "cannot identify"; --keep text that is not there is counted."""
    (photos / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    (photos / "clip.avif").write_bytes(b"\x00" * 8)
    (photos / "notes.txt").write_text("not a caption")
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "renamed.png").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    first = sorted(p.name for p in photos.iterdir() if p.suffix in (".jpg", ".png") and p.stat().st_size > 100)[0]
    (photos / first).with_suffix(".txt").write_text("a caption")
    os.symlink(".", photos / "here")  # a symlink loop: not followed, and said
    result = cli("run", photos, "-o", tmp_path / "t.h5", "--model", TINY, "--workers", "0", "--keep", "txt", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["passed_over"] == {"avif": 1, "heic": 1}  # the .txt files are --keep sidecars, not passed over
    reasons = {f["path"]: f["error"] for f in summary["failures"]}
    assert "the file is empty (0 bytes)" in reasons["empty.jpg"]
    assert "HEIF/HEIC" in reasons["renamed.png"] and "pillow-heif" in reasons["renamed.png"]
    assert summary["missing_meta"] == {"txt": summary["rows"] - 1}
    assert any("passed over by extension (avif 1, heic 1)" in w for w in summary["warnings"])  # tars: test_containers
    assert summary["entries_passed_over"] == {"folder_link_walked": 1}
    assert any("folder links not followed (a symlink loop" in w and w.endswith(": 1") for w in summary["warnings"])
    shown = cli("run", photos, "-o", tmp_path / "u.h5", "--model", TINY, "--workers", "0")
    assert "folder links not followed (a symlink loop, or a second link to a folder already walked): 1" in shown.stdout


def test_info_reads_a_file_while_a_run_writes_it(tmp_path):
    """info on a file a run is writing: the rows committed so far, said to be in progress; a plain
    read (the library's default) is still refused in one line, and another process's plain h5py
    is kept out by HDF5's file lock."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(24):
        Image.fromarray(np.full((64, 64, 3), i * 10, np.uint8)).save(folder / f"{i:02d}.png")
    out = tmp_path / "live.h5"
    run = subprocess.Popen([sys.executable, "-m", "vitcore.cli", "run", str(folder), "-o", str(out), "--model", "small",
                            "--batch-size", "1", "--workers", "0", "--dtype", "float32", "--progress", "none"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = []
    try:
        while run.poll() is None and len(seen) < 2:  # two reads of a file with committed rows, mid-run
            done = subprocess.run([sys.executable, "-m", "vitcore.cli", "info", str(out), "--json"],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                summary = json.loads(done.stdout)
                if summary["being_written"] and summary["rows"] > 0:
                    seen.append(summary)
        assert run.poll() is None, "the run ended before info could watch it"
        with pytest.raises(VitExtractError, match="a vit-extract run is writing it"):
            vitcore.open_tokens(out)
        # HDF5's own lock keeps another process's plain h5py (locking on, its default) out too.
        plain = subprocess.run([sys.executable, "-c", "import sys, h5py; h5py.File(sys.argv[1], 'r')", str(out)],
                               capture_output=True, text=True, timeout=120)
        assert run.poll() is None, "the run ended before the lock could be tried"
        assert plain.returncode != 0 and "unable to lock file" in plain.stderr, plain.stderr[-1500:]
    finally:
        run.terminate()
        run.wait(timeout=120)
    assert all(0 < s["rows"] < 24 and s["complete"] is False and s["written_by"] == "a vit-extract run" for s in seen)
    assert seen, "info never saw the file mid-run"
    assert seen[0]["rows"] <= seen[1]["rows"]


def test_a_file_another_program_holds_open_is_not_blamed_on_a_run(tmp_path):
    """A notebook's h5py.File(out, "a") holds HDF5's lock too; no vit-extract run's lock is held, so
    the reading commands say another program has it open, not that a run is writing it."""
    out = tmp_path / "held.h5"
    vitcore.extract([SAMPLES], out, ExtractOptions(model=TINY, dtype="float32", workers=0))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, h5py\nf = h5py.File(sys.argv[1], 'a')\n"
                               "print('open', flush=True); time.sleep(60)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(VitExtractError, match="another program has it open for writing") as caught:
            vitcore.open_tokens(out)
        assert "vit-extract run" not in str(caught.value)
        done = subprocess.run([sys.executable, "-m", "vitcore.cli", "info", str(out), "--json"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and json.loads(done.stdout)["written_by"] == "another program", done.stderr
    finally:
        holder.kill()
        holder.wait()


def test_the_readme_and_help_name_shard_files_as_the_tool_writes_them(cli):
    from vitcore.run.shard import shard_path

    written = shard_path("tokens.h5", 3, 8)
    assert written == "tokens.shard00003-of-00008.h5"
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"`{written}`" in readme and "OUT.shard" not in readme
    assert written in " ".join(cli("run", "--help").stdout.split())


def test_list_options_take_commas_or_repeats(cli, photos, tmp_path):
    """--ext, --keep (and --columns, --features, --layer) take a comma list, or the option repeated."""
    (photos / "first.jpg").with_suffix(".txt").write_text("a caption")
    (photos / "first.jpg").with_suffix(".json").write_text("{}")
    outs = {}
    for name, args in (("commas", ["--ext", "jpg,png", "--keep", "txt,json"]),
                       ("repeats", ["--ext", "jpg", "--ext", "png", "--keep", "txt", "--keep", "json"])):
        outs[name] = tmp_path / f"{name}.h5"
        done = cli("run", photos, "-o", outs[name], "--model", TINY, "--workers", "0", "-q", *args)
        assert done.exit_code == 0, done.output
    with h5py.File(outs["commas"], "r") as a, h5py.File(outs["repeats"], "r") as b:
        assert list(a["paths"].asstr()[:]) == list(b["paths"].asstr()[:]) and len(a["paths"]) == 8
        assert sorted(a["meta"]) == sorted(b["meta"]) == ["json", "txt"]


def test_info_gives_each_failure_its_root(cli, tmp_path):
    """The same broken name under two roots: info --json gives each failure's root, and the table
    shows them apart."""
    for root in ("a", "b"):
        (tmp_path / root).mkdir()
        (tmp_path / root / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
        Image.fromarray(np.full((30, 30, 3), 9, np.uint8)).save(tmp_path / root / "ok.png")
    out = tmp_path / "t.h5"
    assert cli("run", tmp_path / "a", tmp_path / "b", "-o", out, "--model", TINY, "--workers", "0", "-q").exit_code == 0
    summary = json.loads(cli("info", out, "--json").stdout)
    assert sorted((f["path"], f["root"]) for f in summary["failures"]) == [
        ("broken.jpg", str(tmp_path / "a")), ("broken.jpg", str(tmp_path / "b"))]
    assert summary["untrained"] is True
    table = cli("info", out).stdout
    assert str(tmp_path / "a" / "broken.jpg") in table and str(tmp_path / "b" / "broken.jpg") in table


def test_a_file_that_is_not_an_output_is_a_usage_refusal_for_every_reading_command(cli, tmp_path):
    folder, picture, foreign = tmp_path / "folder", tmp_path / "picture.h5", tmp_path / "foreign.h5"
    folder.mkdir()
    shutil.copy(SAMPLES / "coffee.jpg", picture)  # a JPEG named .h5
    with h5py.File(foreign, "w") as f:
        f["x"] = [1, 2, 3]
    for wrong, words in ((folder, "directory"), (picture, "not a readable HDF5 file"),
                         (foreign, "not a vit-extract output file")):
        for args in (["info", wrong], ["show", wrong, "-o", tmp_path / "s.png"], ["similar", wrong, "coffee.jpg"],
                     ["index", wrong, "-o", tmp_path / "i.faiss"], ["vllm-cache", wrong, tmp_path / "cache"],
                     ["merge", wrong, "-o", tmp_path / "m.h5"]):
            result = cli(*args)
            assert result.exit_code == 2 and words in result.stderr, (args, result.output)
            # (a folder is refused by the argument's parser, which the test runner draws in a box)
            assert wrong is folder or result.stderr.count("\n") == 1, (args, result.stderr)
    # An output of ours cut short (a crash during a copy) is damage, not a usage mistake: exit 1
    whole = tmp_path / "whole.h5"
    vitcore.extract([SAMPLES], whole, ExtractOptions(model=TINY, dtype="float32", workers=0))
    cut = tmp_path / "cut.h5"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    for args in (["info", cut], ["show", cut, "-o", tmp_path / "s.png"], ["merge", cut, "-o", tmp_path / "m.h5"]):
        result = cli(*args)
        assert result.exit_code == 1 and "a damaged HDF5 file" in result.stderr, (args, result.output)


def test_max_image_pixels_sets_the_decompression_bomb_limit_in_the_workers_and_the_dry_run(cli, tmp_path, monkeypatch):
    from PIL import Image

    pictures = tmp_path / "pictures"
    pictures.mkdir()
    Image.new("RGB", (3000, 1000), (200, 40, 40)).save(pictures / "panorama.png")  # 3 megapixels
    shutil.copy(SAMPLES / "coffee.jpg", pictures / "coffee.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000_000)  # Pillow's own limit, lowered (forked workers inherit it)
    both = ["coffee.jpg", "panorama.png"]
    for max_pixels, rows in (("1000000", ["coffee.jpg"]), (None, ["coffee.jpg"]), ("0", both), ("5000000", both)):
        out = tmp_path / f"{max_pixels}.h5"
        more = ["--max-image-pixels", max_pixels] if max_pixels else []
        planned = json.loads(cli("run", pictures, "-o", out, "--model", TINY, "--dry-run", "--json", *more).stdout)
        assert planned["to_read"] == 2 and planned["calibration_failures"] == 2 - len(rows)  # decoded as a run would
        result = cli("run", pictures, "-o", out, "--model", TINY, "--workers", "2", "--json", *more)
        summary = json.loads(result.stdout)
        with h5py.File(out) as f:
            assert sorted(f["paths"].asstr()[:]) == rows, max_pixels
        if len(rows) == 1:
            (failure,) = summary["failures"]
            limit = int(max_pixels) if max_pixels else 2_000_000  # the one that applied, not Pillow's twice it
            assert failure["path"] == "panorama.png" and failure["error"] == (
                f"DecompressionBombError: 3,000,000 pixels, over the limit of {limit:,} (`vit-extract run "
                "--max-image-pixels N` raises it, 0 lifts it)")
        assert Image.MAX_IMAGE_PIXELS == 2_000_000  # the process's own limit is put back
    assert cli("run", pictures, "-o", tmp_path / "x.h5", "--max-image-pixels", "-1").exit_code == 2
    # similar reads a new query picture under the same limit, with the same option; show and similar's
    # sheet draw the originals of stored rows whatever their size (their run read them).
    lifted = tmp_path / "0.h5"
    refused = cli("similar", lifted, pictures / "panorama.png", "-k", "1")
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.output
    assert "3,000,000 pixels, over the limit of 2,000,000 (`vit-extract similar --max-image-pixels N`" in refused.stderr
    found = cli("similar", lifted, pictures / "panorama.png", "-k", "1", "--json", "--max-image-pixels", "0",
                "--sheet", tmp_path / "hits.png")
    assert found.exit_code == 0 and json.loads(found.stdout)[0]["key"] == "panorama.png", found.output
    with Image.open(tmp_path / "hits.png") as sheet:  # the hit drawn (a red picture), not "original not found"
        assert dict((c, n) for n, c in sheet.convert("RGB").getcolors(1 << 20)).get((200, 40, 40), 0) > 1000
    shown = cli("show", lifted, "panorama.png", "-o", tmp_path / "s.png")
    assert shown.exit_code == 0 and shown.stderr == "", shown.output
    with Image.open(tmp_path / "s.png") as sheet:
        assert dict((c, n) for n, c in sheet.convert("RGB").getcolors(1 << 20)).get((200, 40, 40), 0) > 1000
    # ... up to the size the run read: a larger picture put in its place since is not decoded
    Image.new("RGB", (3000, 1500), (200, 40, 40)).save(pictures / "panorama.png")  # 4.5 megapixels
    shown = cli("show", lifted, "panorama.png", "-o", tmp_path / "s2.png")
    assert shown.exit_code == 0, shown.output
    with Image.open(tmp_path / "s2.png") as sheet:
        assert dict((c, n) for n, c in sheet.convert("RGB").getcolors(1 << 20)).get((200, 40, 40), 0) == 0
    assert Image.MAX_IMAGE_PIXELS == 2_000_000


def test_damage_inside_an_output_is_one_line_exit_1(tmp_path):
    from cli.main import _damaged_hdf5

    whole = tmp_path / "whole.h5"
    vitcore.extract([SAMPLES], whole, ExtractOptions(model=TINY, dtype="float32", workers=0))
    data = whole.read_bytes()
    heap = data.find(b"GCOL")  # the global heap that holds the keys' strings: its signature broken
    assert heap > 0
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(data[:heap] + b"XXXX" + data[heap + 4:])
    for command in (["info", str(damaged)], ["show", str(damaged), "-o", str(tmp_path / "s.png")]):
        done = subprocess.run([sys.executable, "-m", "vitcore.cli", *command], capture_output=True, text=True,
                              cwd=Path(__file__).parent.parent, timeout=60)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 1 and len(lines) == 1 and "is damaged inside" in lines[0], done.stderr[-1500:]
    with h5py.File(whole) as f:  # what tells damage: an error raised inside h5py, not one of ours
        with pytest.raises(KeyError) as inside:
            f["no such dataset"]
    assert _damaged_hdf5(inside.value) and not _damaged_hdf5(KeyError("x")) and not _damaged_hdf5(ValueError("x"))


def test_a_name_with_a_newline_is_one_line_in_every_list(cli, photos, tmp_path):
    (photos / "bad\nname.jpg").write_bytes(b"\xff\xd8\xff not a whole JPEG")
    shutil.copy(photos / "coffee.jpg", photos / "two\nlines.jpg")
    out = tmp_path / "t.h5"
    ran = cli("run", photos, "-o", out, "--model", TINY, "--pool", "mean")
    shown = cli("info", out)
    hits = cli("similar", out, "coffee.jpg", "-k", "3")
    for result in (ran, shown):
        assert result.exit_code == 0 and "bad\\nname.jpg: " in result.stdout, result.stdout
        assert not any(line.startswith("name.jpg") for line in result.stdout.splitlines())
    assert hits.exit_code == 0 and "two\\nlines.jpg" in hits.stdout, hits.stdout
    assert not any(line.strip().startswith("lines.jpg") for line in hits.stdout.splitlines())
