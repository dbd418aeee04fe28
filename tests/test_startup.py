"""Refusals come before torch is imported: a bad option, a missing input, an output that exists,
and a --resume of a file made with other settings (seed and Qwen-VL files; for the transformers and
timm towers, whose record needs torch, every setting known without it: weights, pooling, dtypes,
compression), each in one line."""

import subprocess
import sys
import textwrap

import pytest

import vitcore
from tests.helpers import HF_CHECKPOINTS, TINY, save_tiny_qwen2vl
from vitcore.run.pipeline import ExtractOptions

PROBE = textwrap.dedent("""
    import sys
    from vitcore.cli.main import main
    sys.argv = ["vit-extract", *sys.argv[1:]]
    try:
        main()
    except SystemExit as done:
        code = done.code
    print("TORCH" if "torch" in sys.modules else "NO-TORCH", code)
""")


def _refused(*args):
    ran = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True)
    last = ran.stdout.strip().splitlines()[-1].split()
    return last[0], int(last[1]), ran.stderr.strip()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("startup")
    pictures = folder / "pictures"
    pictures.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (64, 48), (40 * i, 90, 200)).save(pictures / f"{i}.png")
    seed_file = folder / "seed.h5"
    vitcore.extract([pictures], seed_file, ExtractOptions(model=TINY, dtype="float32", workers=0))
    qwen = folder / "qwen2vl"
    save_tiny_qwen2vl(qwen)
    qwen_file = folder / "qwen.h5"
    vitcore.extract([pictures], qwen_file, ExtractOptions(weights=str(qwen), dtype="float32", workers=0))
    return folder, pictures, seed_file, qwen, qwen_file


def test_refusals_come_before_torch_in_one_line(files):
    folder, pictures, seed_file, qwen, qwen_file = files
    cases = [
        (["run", pictures, "-o", folder / "x.h5", "--batch-size", "0"], "batch-size"),
        (["run", folder / "missing", "-o", folder / "x.h5"], "does not exist"),
        (["run", pictures, "-o", seed_file, "--model", TINY], "--overwrite"),  # exists, no --resume
        (["run", pictures, "-o", seed_file, "--model", TINY, "--resume", "--out-dtype", "float32"], "--out-dtype"),
        (["run", pictures, "-o", seed_file, "--model", "small", "--resume"], "encoder"),
        (["run", pictures, "-o", seed_file, "--model", TINY, "--resume", "--dtype", "bfloat16"], "compute dtype"),
        (["run", pictures, "-o", qwen_file, "--weights", qwen, "--resume", "--pool", "mean"], "pooling"),
        (["run", pictures, "-o", qwen_file, "--weights", qwen, "--resume", "--resolution", "56"], "preprocessing"),
    ]
    for args, words in cases:
        torch_state, code, stderr = _refused(*args)
        assert code == 2, (args, stderr)
        assert words in stderr and stderr.count("\n") == 0, (args, stderr)
        assert torch_state == "NO-TORCH", (args, stderr)


def test_a_resume_with_the_same_settings_goes_on(files):
    folder, pictures, seed_file, qwen, qwen_file = files
    result = vitcore.extract([pictures], qwen_file, ExtractOptions(weights=str(qwen), dtype="float32", workers=0),
                             resume=True)
    assert result.skipped == 2 and result.written == 0 and result.complete


def test_transformers_tower_resume_refusals_come_before_torch(files, tmp_path):
    pytest.importorskip("transformers")
    folder, pictures, *_ = files
    save = HF_CHECKPOINTS["clip"][0]
    clip, other = save(tmp_path / "clip"), HF_CHECKPOINTS["dinov2"][0](tmp_path / "dinov2")
    made = tmp_path / "clip.h5"
    vitcore.extract([pictures], made, ExtractOptions(weights=str(clip), dtype="float32", workers=0))
    base = ["run", pictures, "-o", made, "--weights", clip, "--resume"]
    cases = [
        (base + ["--pool", "mean"], "pooling"),
        (base + ["--out-dtype", "float32"], "--out-dtype"),
        (base + ["--compression", "gzip"], "--compression"),
        (base + ["--dtype", "bfloat16"], "compute dtype"),
        (["run", pictures, "-o", made, "--weights", other, "--resume"], "weights"),
    ]
    for args, words in cases:
        torch_state, code, stderr = _refused(*args)
        assert code == 2 and words in stderr and stderr.count("\n") == 0, (args, stderr)
        assert torch_state == "NO-TORCH", (args, stderr)
    # What only the record knows is still refused, after torch, in one line; the same settings go on.
    torch_state, code, stderr = _refused(*base, "--layer", "0")
    assert code == 2 and "--layer list" in stderr and stderr.count("\n") == 0, stderr
    again = vitcore.extract([pictures], made, ExtractOptions(weights=str(clip), dtype="float32", workers=0), resume=True)
    assert again.skipped == 2 and again.written == 0 and again.complete


def test_timm_resume_refusals_come_before_torch(files, tmp_path):
    timm = pytest.importorskip("timm", reason="timm (and the torchvision it needs) is not installed")
    import torch
    from safetensors.torch import save_file

    folder, pictures, *_ = files
    weights = tmp_path / "vit.safetensors"
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    other = tmp_path / "other.safetensors"
    with torch.no_grad():
        save_file({k: (v + 0.01).contiguous() for k, v in model.state_dict().items()}, str(other))
    made = tmp_path / "timm.h5"
    vitcore.extract([pictures], made, ExtractOptions(model="timm:vit_tiny_patch16_224", weights=str(weights),
                                                     dtype="float32", workers=0))
    model_args = ["--model", "timm:vit_tiny_patch16_224", "--resume"]
    for args, words in [(["--weights", weights, "--pool", "max"], "pooling"), (["--weights", other], "weights")]:
        torch_state, code, stderr = _refused("run", pictures, "-o", made, *model_args, *args)
        assert code == 2 and words in stderr and stderr.count("\n") == 0, (args, stderr)
        assert torch_state == "NO-TORCH", (args, stderr)


def test_unresumable_files_and_a_held_output_are_refused_before_torch(files, tmp_path):
    folder, pictures, seed_file, *_ = files
    empty, foreign, partial = tmp_path / "empty.h5", tmp_path / "foreign.h5", tmp_path / "partial.h5"
    picture = tmp_path / "picture.h5"
    empty.write_bytes(b"")
    picture.write_bytes((pictures / "0.png").read_bytes())
    import h5py

    with h5py.File(foreign, "w") as f:
        f["x"] = [1, 2, 3]
    cut = tmp_path / "cut.h5"  # an output cut short by a copy
    cut.write_bytes(seed_file.read_bytes()[:4096])
    with h5py.File(partial, "w") as f:  # begun by vit-extract, its state never written
        f.attrs["vit_extract_version"] = "0.7.0"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from vitcore.store.lock import OutputLock\n"
         f"with OutputLock({str(seed_file)!r}):\n    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cases = [
            (["run", pictures, "-o", empty, "--model", TINY, "--resume"],
             "it is not a vit-extract output (an empty file); give another -o"),
            (["run", pictures, "-o", picture, "--model", TINY, "--resume"], "not a vit-extract output (not an HDF5 file)"),
            (["run", pictures, "-o", cut, "--model", TINY, "--resume"], "it is a damaged HDF5 file ("),
            (["run", pictures, "-o", cut, "--model", TINY],
             "already exists and is a damaged HDF5 file ("),
            (["run", pictures, "-o", foreign, "--model", TINY, "--resume"],
             "it is not a vit-extract output (an HDF5 file of another program); give another -o"),
            (["run", pictures, "-o", partial, "--model", TINY, "--resume"], "not a complete vit-extract output"),
            # Somebody else's file is not advised to be resumed, nor replaced first; an output is.
            (["run", pictures, "-o", foreign, "--model", TINY],
             "already exists and is not a vit-extract output (an HDF5 file of another program): give another -o"),
            (["run", pictures, "-o", picture, "--model", TINY], "is not a vit-extract output (not an HDF5 file)"),
            (["run", pictures, "-o", empty, "--model", TINY], "already exists (an empty file); add --overwrite"),
            (["run", pictures, "-o", partial, "--model", TINY], "already exists; add --resume to continue it"),
            (["run", pictures, "-o", seed_file, "--model", TINY, "--resume"], f"another vit-extract run (pid {holder.pid}"),
            (["run", pictures, "-o", seed_file, "--model", TINY, "--overwrite"], "another vit-extract run"),
        ]
        for args, words in cases:
            torch_state, code, stderr = _refused(*args)
            assert code != 0 and words in stderr and stderr.count("\n") == 0, (args, stderr)
            assert torch_state == "NO-TORCH", (args, stderr)
        from vitcore.store.lock import run_holding

        link = tmp_path / "link.h5"
        link.symlink_to(seed_file)  # a run locks the target: seen through a link to it too
        assert f"pid {holder.pid}" in run_holding(str(link)) and run_holding(str(foreign)) is None
    finally:
        holder.kill()
        holder.wait()


def test_a_local_run_imports_neither_object_storage_nor_ray(files, tmp_path):
    folder, pictures, *_ = files
    probe = PROBE.replace('print("TORCH"', 'print(*[m for m in ("fsspec", "s3fs", "botocore", "ray") if m in sys.modules], '
                                            'file=sys.stderr); print("TORCH"')
    ran = subprocess.run([sys.executable, "-c", probe, "run", str(pictures), "-o", str(tmp_path / "t.h5"),
                          "--model", TINY, "--workers", "0", "--quiet"], capture_output=True, text=True)
    assert ran.stdout.split()[-1] == "0"  # the run went through
    assert ran.stderr.strip() == ""  # none of the extras' modules was imported
