"""Refusals come before torch is imported: a bad option, a missing input, an output that exists,
and a --resume of a file made with other settings (seed and Qwen-VL files), each in one line."""

import subprocess
import sys
import textwrap

import pytest

import vitcore
from tests.helpers import TINY, save_tiny_qwen2vl
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
