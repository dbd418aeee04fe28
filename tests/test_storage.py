"""Compact storage: --out-dtype bfloat16 and --compression gzip | lz4 | zstd. Every combination
stores the float32 run's tokens rounded to its dtype; resume, merge and every reader keep working;
plain h5py reads the files as the README says."""

import subprocess
import sys
import textwrap

import h5py
import ml_dtypes
import numpy as np
import pytest
import torch

import vitcore
from tests.helpers import TINY
from vitcore.errors import Interrupted, ResumeMismatchError
from vitcore.run.pipeline import ExtractOptions, StopFlag
from vitcore.store.merge import merge

REFERENCE = ExtractOptions(model=TINY, out_dtype="float32", dtype="float32", device="cpu", workers=0, batch_size=3,
                           layers=(-2,))
CASES = [("bfloat16", "none"), ("bfloat16", "zstd"), ("float16", "gzip"), ("bfloat16", "lz4"), ("float32", "zstd")]
ROUNDED = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


def _stored(path, name="tokens"):
    """key → rows of ``name`` as vit-extract's reader gives them."""
    with vitcore.open_tokens(path) as f:
        return {key: f.read(name, key) for key in f.keys}


@pytest.fixture
def reference(photos, tmp_path):
    out = tmp_path / "float32.h5"
    vitcore.extract([photos], out, REFERENCE)
    return out


@pytest.mark.parametrize("out_dtype,compression", CASES)
def test_stored_tokens_are_the_float32_run_rounded_to_the_dtype(photos, tmp_path, reference, out_dtype, compression):
    out = tmp_path / "compact.h5"
    vitcore.extract([photos], out, REFERENCE, out_dtype=out_dtype, compression=compression)
    for name in ("tokens", "mean", "layers/-2"):
        expected, got = _stored(reference, name), _stored(out, name)
        assert got.keys() == expected.keys()
        for key, values in got.items():
            assert values.dtype == np.dtype(ROUNDED[out_dtype]), values.dtype
            # torch rounds float32 → bfloat16 / float16 to nearest even, as numpy and ml_dtypes do
            np.testing.assert_array_equal(values, expected[key].astype(ROUNDED[out_dtype]))
    with h5py.File(out, "r") as h5:
        assert h5.attrs["out_dtype"] == out_dtype and h5.attrs["compression"] == compression
        assert h5["tokens"].compression == {"none": None, "gzip": "gzip"}.get(compression, h5["tokens"].compression)
        if compression != "none":
            assert h5["tokens"].shuffle and h5["tokens"].id.get_create_plist().get_nfilters() == 2
    if compression != "none":  # it does compress: tokens of random weights still have compressible high bytes
        plain = tmp_path / "plain.h5"
        vitcore.extract([photos], plain, REFERENCE, out_dtype=out_dtype)
        assert out.stat().st_size < 0.97 * plain.stat().st_size


def test_plain_h5py_reads_bfloat16_as_float32_and_zstd_after_importing_hdf5plugin(photos, tmp_path, reference):
    """The README's reading recipe, in a fresh interpreter (no filter registered by vit-extract)."""
    out = tmp_path / "bf16.h5"
    vitcore.extract([photos], out, REFERENCE, out_dtype="bfloat16", compression="zstd")
    expected = _stored(reference)
    script = textwrap.dedent(f"""
        import sys
        import h5py
        with h5py.File({str(out)!r}, "r") as f:
            try:
                f["tokens"][0]
            except OSError as err:
                print("without hdf5plugin:", str(err).splitlines()[0])
        import hdf5plugin  # registers the zstd and lz4 filters
        import numpy as np
        with h5py.File({str(out)!r}, "r") as f:
            keys = list(f["paths"].asstr()[:])
            np.save(sys.stdout.buffer, np.stack([f["tokens"][i] for i in range(len(keys))]))
            print("\\n" + "\\t".join(keys) + "\\n" + str(f["tokens"].dtype))
    """)
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True)
    first, _, rest = ran.stdout.partition(b"\x93NUMPY")
    assert b"without hdf5plugin:" in first  # HDF5 cannot apply the zstd filter (it looks for a plugin and fails)
    import io
    buffer = io.BytesIO(b"\x93NUMPY" + rest)
    tokens = np.load(buffer)
    keys_line, dtype_line = buffer.read().decode().strip().split("\n")
    assert dtype_line == "float32" and tokens.dtype == np.float32  # HDF5 converts bfloat16 exactly
    for key, values in zip(keys_line.split("\t"), tokens):
        np.testing.assert_array_equal(values, expected[key].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_resume_and_merge_over_bfloat16_zstd_files(photos, tmp_path):
    options = ExtractOptions(model=TINY, out_dtype="bfloat16", compression="zstd", dtype="float32", device="cpu",
                             workers=0, batch_size=3)
    full = tmp_path / "full.h5"
    vitcore.extract([photos], full, options)
    part = tmp_path / "part.h5"
    stop = StopFlag()
    with pytest.raises(Interrupted):
        vitcore.extract([photos], part, options, stop=stop, progress=lambda p: p.done >= 3 and stop.set())
    with pytest.raises(ResumeMismatchError, match="--compression"):
        vitcore.extract([photos], part, options, resume=True, compression="gzip")
    result = vitcore.extract([photos], part, options, resume=True)
    assert result.skipped == 3 and result.complete
    expected = _stored(full)
    got = _stored(part)
    assert list(got) == list(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key].view(np.uint16), expected[key].view(np.uint16))  # bit for bit

    parts = [tmp_path / f"part{index}.h5" for index in range(2)]
    for index, part_file in enumerate(parts):
        vitcore.extract([photos], part_file, options, shard=(index, 2))
    for virtual in (False, True):
        merged = tmp_path / f"merged-{virtual}.h5"
        merge(str(merged), [str(p) for p in parts], virtual=virtual)
        got = _stored(merged)
        assert sorted(got) == sorted(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key].view(np.uint16), expected[key].view(np.uint16))
        with h5py.File(merged, "r") as h5:
            assert h5.attrs["out_dtype"] == "bfloat16" and h5.attrs["compression"] == "zstd"
            if not virtual:  # a copy keeps the dtype and the filter
                assert h5["tokens"].id.get_type().get_fields() == (15, 7, 8, 0, 7)
                assert h5["tokens"].id.get_create_plist().get_nfilters() == 2


def test_token_dataset_gives_bfloat16_tensors_bit_for_bit(photos, tmp_path):
    out = tmp_path / "bf16.h5"
    vitcore.extract([photos], out, REFERENCE, out_dtype="bfloat16")
    stored = _stored(out)
    dataset = vitcore.TokenDataset(out)
    item = dataset[0]
    assert item["tokens"].dtype == torch.bfloat16
    np.testing.assert_array_equal(item["tokens"].view(torch.int16).numpy(), stored[item["key"]].view(np.int16))


def test_info_names_the_dtype_and_the_compression(cli, photos, tmp_path):
    out = tmp_path / "bf16.h5"
    result = cli("run", photos, "-o", out, "--model", TINY, "--out-dtype", "bfloat16", "--compression", "gzip",
                 "--quiet")
    assert result.exit_code == 0, result.output
    shown = cli("info", out).output
    assert "bfloat16, gzip-compressed" in shown
    import json
    described = json.loads(cli("info", out, "--json").output)
    assert described["compression"] == "gzip" and described["out_dtype"] == "bfloat16"
    assert described["datasets"]["tokens"]["dtype"] == "bfloat16"


def test_missing_hdf5plugin_is_one_line_for_writing_and_for_reading(photos, tmp_path):
    out = tmp_path / "z.h5"
    vitcore.extract([photos], out, REFERENCE, compression="lz4")
    script = textwrap.dedent("""
        import sys
        sys.modules["hdf5plugin"] = None  # as if it were not installed
        from vitcore.cli.main import main
        sys.argv = sys.argv[:1] + sys.argv[1:]
        main()
    """)
    write = subprocess.run([sys.executable, "-c", script, "run", str(photos), "-o", str(tmp_path / "new.h5"),
                            "--model", TINY, "--compression", "zstd"], capture_output=True, text=True)
    assert write.returncode == 2, write.stderr
    assert write.stderr.strip().count("\n") == 0 and "pip install 'vit-extract[compression]'" in write.stderr
    assert not (tmp_path / "new.h5").exists()
    info = subprocess.run([sys.executable, "-c", script, "info", str(out)], capture_output=True, text=True)
    assert info.returncode == 0 and "lz4-compressed" in info.stdout  # the layout and settings need no filter
    read = subprocess.run([sys.executable, "-c", script, "similar", str(out), "coffee.jpg"], capture_output=True,
                          text=True)
    assert read.returncode != 0
    assert read.stderr.strip().count("\n") == 0 and "compressed with lz4" in read.stderr
    assert "vit-extract[compression]" in read.stderr
