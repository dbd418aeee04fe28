"""--decode gpu: the CPU fallback, the on-device resize against Pillow's, and the batch plumbing
(workers hand over JPEG bytes, the main process decodes, refusals go back to Pillow) run here with
a stand-in for nvJPEG that decodes with Pillow. nvJPEG itself runs in bench/cuda_check.py."""

import io
import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import vitcore
from tests.helpers import TINY
from vitcore.encoders.seed import gpu_decode
from vitcore.run.pipeline import ExtractOptions
from vitcore.encoders.seed.processor import PAD_COLOR, PreprocessConfig, resize

EXACT = ExtractOptions(model=TINY, out_dtype="float32", dtype="float32", device="cpu", workers=0, batch_size=4)


def _read(path):
    with h5py.File(path, "r") as f:
        return (list(f["paths"].asstr()[:]), f["tokens"][:], f["image_size"][:],
                sorted(f["failed/paths"].asstr()[:]), json.loads(f.attrs["preprocessing"]))


def test_without_a_gpu_it_decodes_on_the_cpu_says_so_and_records_it(photos, tmp_path):
    draft = vitcore.extract([photos], tmp_path / "draft.h5", EXACT, decode="draft")
    result = vitcore.extract([photos], tmp_path / "gpu.h5", EXACT, decode="gpu")
    assert any("--decode gpu needs a CUDA device" in w and "draft" in w for w in result.warnings)
    assert not draft.warnings
    keys, tokens, _, _, prep = _read(tmp_path / "gpu.h5")
    ref_keys, ref_tokens, _, _, _ = _read(tmp_path / "draft.h5")
    assert prep["decode"] == "draft" and keys == ref_keys
    np.testing.assert_array_equal(tokens, ref_tokens)


@pytest.mark.parametrize("mode", ["squash", "crop", "pad"])
def test_the_on_device_resize_is_pillows_to_within_one_grey_level(photos, mode):
    cfg = PreprocessConfig(image_size=224, resize=mode)
    for path in sorted(photos.iterdir()):
        with Image.open(path) as img:
            rgb = ImageOps.exif_transpose(img).convert("RGB")
        expected = resize(rgb, cfg).astype(np.int16)
        got = gpu_decode.resize_on_device(torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1), cfg)
        assert got.shape == (224, 224, 3) and got.dtype == torch.uint8
        diff = np.abs(got.numpy().astype(np.int16) - expected)
        assert diff.max() <= 1 and diff.mean() < 0.01, (path.name, diff.max(), diff.mean())
        if mode == "pad" and rgb.width != rgb.height:  # the letterbox bands are exactly the pad colour
            assert tuple(got[0, 0].tolist()) == PAD_COLOR


def _pillow_stand_in(datas, device):
    """Decodes like nvJPEG through torchvision: RGB (3, H, W) as stored, EXIF orientation not
    applied; one file it refuses (here: progressive JPEGs) fails the whole call."""
    out = []
    for data in datas:
        if b"\xff\xc2" in data.numpy().tobytes():  # a progressive frame header
            raise RuntimeError("unsupported JPEG")
        with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
            out.append(torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).to(device))
    return out


def test_exif_orientation_is_applied_as_pillow_applies_it():
    stored = Image.fromarray(np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        stored.save(buffer, format="PNG", exif=exif)
        expected = np.asarray(ImageOps.exif_transpose(Image.open(buffer)).convert("RGB"))
        got = gpu_decode.exif_orient(torch.from_numpy(np.asarray(stored).copy()).permute(2, 0, 1), orientation)
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), expected, err_msg=f"orientation {orientation}")


@pytest.mark.parametrize("workers", [0, 2])
def test_jpegs_decoded_in_the_main_process_keep_every_row_and_failure_in_place(photos, tmp_path, monkeypatch, workers):
    good = (photos / "chelsea.jpg").read_bytes()
    (photos / "c_truncated.jpg").write_bytes(good[: len(good) * 6 // 10])  # header fine, data cut
    Image.new("CMYK", (90, 60), (0, 120, 200, 10)).save(photos / "d_cmyk.jpg")  # decoded by Pillow instead
    rotated = Image.open(photos / "chelsea.jpg")
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(photos / "e_rotated.jpg", exif=exif)
    (photos / "f_text.jpg").write_text("not a picture")
    Image.open(photos / "chelsea.jpg").save(photos / "g_progressive.jpg", progressive=True)
    vitcore.extract([photos], tmp_path / "full.h5", EXACT, decode="full", workers=workers)

    calls = []
    monkeypatch.setattr(gpu_decode, "MAX_DECODE_PIXELS", 300_000)  # a few photos per decode call
    monkeypatch.setattr(gpu_decode, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(gpu_decode, "decode_jpegs", lambda datas, device: calls.append(len(datas))
                        or _pillow_stand_in(datas, device))
    result = vitcore.extract([photos], tmp_path / "gpu.h5", EXACT, decode="gpu", workers=workers)
    assert result.complete and len(calls) > 2  # the device path ran, in several calls
    # The truncated JPEG has no end marker: Pillow decodes it in the worker (and fails); the
    # progressive one is refused by the stand-in and decoded by Pillow in the main process.
    assert result.warnings == ["JPEGs the GPU decoder refused, decoded by Pillow instead: 1"]
    keys, tokens, sizes, failed, prep = _read(tmp_path / "gpu.h5")
    ref_keys, ref_tokens, ref_sizes, ref_failed, _ = _read(tmp_path / "full.h5")
    assert prep["decode"] == "gpu" and "on the GPU" in prep["interpolation"]
    assert keys == ref_keys and {"d_cmyk.jpg", "e_rotated.jpg", "g_progressive.jpg"} <= set(keys)
    assert failed == ref_failed == ["c_truncated.jpg", "f_text.jpg"]
    np.testing.assert_array_equal(sizes, ref_sizes)
    assert tuple(sizes[keys.index("e_rotated.jpg")]) == (rotated.height, rotated.width)  # upright
    # Every token of every row is the reference's (the same decoder here, Pillow's resize to within
    # one grey level: test_the_on_device_resize_is_pillows_to_within_one_grey_level), and is nearer
    # its own row's token than any other row's: a row out of place, or a few wrong tokens, fail.
    a, b = tokens.reshape(-1, tokens.shape[-1]), ref_tokens.reshape(-1, tokens.shape[-1])  # (N·T, D)
    per_token = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    assert per_token.max() < 5e-3, per_token.max()  # measured 1.0e-3; a wrong token is off by ~1
    rows_a, rows_b = tokens.reshape(len(keys), -1), ref_tokens.reshape(len(keys), -1)
    distances = np.linalg.norm(rows_a[:, None] - rows_b[None], axis=2)  # (N, N)
    assert (distances.argmin(axis=1) == np.arange(len(keys))).all()
    with h5py.File(tmp_path / "gpu.h5") as f:
        reasons = dict(zip(f["failed/paths"].asstr()[:], f["failed/errors"].asstr()[:]))
    assert "truncated" in reasons["c_truncated.jpg"] and "\n" not in reasons["c_truncated.jpg"]
