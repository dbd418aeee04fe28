"""The compute dtype: what --dtype auto decides from its inputs (faked here, so every machine runs
every branch), and bf16 tokens against the float32 reference for the seed encoder and each Qwen-VL
family, within a bound set by bf16's own rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitcore
from tests.helpers import SAMPLES, TINY, save_tiny_qwen2vl, save_tiny_qwen3vl
from vitcore.system import device as devices

BF16_UNIT_ROUNDOFF = 2.0 ** -8  # bf16 keeps 8 significant bits


@pytest.mark.parametrize("probes, flags, expected", [
    ({"_is_amx_tile_supported": True, "_is_avx512_bf16_supported": False}, None, torch.bfloat16),
    ({"_is_amx_tile_supported": False, "_is_avx512_bf16_supported": True}, None, torch.bfloat16),
    ({"_is_amx_tile_supported": False, "_is_avx512_bf16_supported": False}, None, torch.float32),
    (None, "flags : fpu avx2 amx_bf16 amx_tile", torch.bfloat16),  # an older torch: the kernel's flags
    (None, "flags : fpu avx2 avx512f avx512_bf16", torch.bfloat16),
    (None, "flags : fpu avx2 avx512f", torch.float32),
])
def test_without_an_encoder_to_time_auto_follows_the_cpus_bf16_flags(monkeypatch, probes, flags, expected):
    devices.cpu_has_native_bf16.cache_clear()  # decided afresh from the faked inputs
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        if probes is None:  # the probes raise, as on a torch without them working
            monkeypatch.setattr(torch.cpu, name, lambda: (_ for _ in ()).throw(RuntimeError("no probe")), raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda value=probes[name]: value, raising=False)
    if flags is not None:
        real_open = open

        def fake_open(path, *args, **kwargs):
            if str(path) == "/proc/cpuinfo":
                import io
                return io.StringIO(flags + "\n")
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr("builtins.open", fake_open)
    try:
        assert devices.resolve_dtype("auto", torch.device("cpu")) == expected
        assert devices.resolve_dtype("float32", torch.device("cpu")) == torch.float32  # explicit wins
    finally:
        devices.cpu_has_native_bf16.cache_clear()


def _fake_products(seconds: dict, calls: list):
    """A stand-in for timing products: ``seconds`` per dtype, each call noted (the decision logic
    is tested, not the clock)."""
    def measure(dtype, rows, width):
        calls.append((dtype, rows, width))
        return seconds[dtype]
    return measure


@pytest.mark.parametrize("float32, bfloat16, expected, words", [
    (1.0, 1.75, torch.float32, "float32: bf16 ran at 0.57× float32's matrix-product speed"),  # AVX-512-BF16, no AMX
    (1.0, 0.2, torch.bfloat16, "bfloat16: 5.00× float32's matrix-product speed"),  # AMX
    (1.0, 0.97, torch.float32, "bf16 ran at 1.03×"),  # not clearly faster: exact float32 kept
])
def test_auto_on_the_cpu_times_the_encoders_products_and_keeps_the_result(monkeypatch, tmp_path, float32, bfloat16,
                                                                         expected, words):
    from vitcore.system import calibrate

    monkeypatch.setenv("VIT_EXTRACT_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(calibrate, "product_seconds", _fake_products({torch.float32: float32, torch.bfloat16: bfloat16}, calls))
    first = devices.choose_dtype("auto", torch.device("cpu"), width=768)
    assert first.dtype == expected and words in first.reason and "measured on this CPU" in first.reason
    assert calls and all(width == 768 for _, _, width in calls)
    assert {dtype for dtype, _, _ in calls} == {torch.float32, torch.bfloat16}

    calls.clear()  # the second run reads what the first measured
    again = devices.choose_dtype("auto", torch.device("cpu"), width=768)
    assert again.dtype == expected and not calls and "measured earlier on this CPU" in again.reason
    assert devices.choose_dtype("float32", torch.device("cpu"), width=768).reason is None  # named: no measuring
    assert not calls

    monkeypatch.setattr(torch, "__version__", "9.9.9")  # another torch: measured again
    devices.choose_dtype("auto", torch.device("cpu"), width=768)
    assert calls
    calls.clear()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # the same CPU held to other kernels: again
    devices.choose_dtype("auto", torch.device("cpu"), width=768)
    assert calls
    calls.clear()
    monkeypatch.setattr(calibrate, "machine_key", lambda: "another CPU | avx2 | 8 cpus")  # another machine: again
    devices.choose_dtype("auto", torch.device("cpu"), width=768)
    assert calls
    calls.clear()
    devices.choose_dtype("auto", torch.device("cpu"), width=1024)  # another encoder width: again
    assert calls
    assert (tmp_path / "dtype.json").is_file()


def test_a_damaged_or_unwritable_cache_only_means_measuring_again(monkeypatch, tmp_path):
    from vitcore.system import calibrate

    calls = []
    monkeypatch.setattr(calibrate, "product_seconds", _fake_products({torch.float32: 1.0, torch.bfloat16: 2.0}, calls))
    monkeypatch.setenv("VIT_EXTRACT_CACHE_DIR", str(tmp_path))
    (tmp_path / "dtype.json").write_text("{ not json")
    assert devices.choose_dtype("auto", torch.device("cpu"), width=512).dtype == torch.float32 and calls
    blocked = tmp_path / "a file"
    blocked.write_text("")
    monkeypatch.setenv("VIT_EXTRACT_CACHE_DIR", str(blocked / "cache"))  # cannot be made: still decided
    assert devices.choose_dtype("auto", torch.device("cpu"), width=512).dtype == torch.float32


def test_a_failed_measurement_falls_back_to_the_flags_and_says_so(monkeypatch, tmp_path):
    from vitcore.system import calibrate

    monkeypatch.setenv("VIT_EXTRACT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "product_seconds", lambda *a: (_ for _ in ()).throw(RuntimeError("no bf16 kernel")))
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    chosen = devices.choose_dtype("auto", torch.device("cpu"), width=512)
    assert chosen.dtype == torch.float32 and "measuring failed (no bf16 kernel)" in chosen.reason
    small = devices.choose_dtype("auto", torch.device("cpu"), width=32)  # too small to time: the flags
    assert small.dtype == torch.float32 and "too small to time fairly" in small.reason


def test_a_run_says_what_auto_chose_and_why(monkeypatch, tmp_path, cli):
    from vitcore.system import calibrate

    monkeypatch.setenv("VIT_EXTRACT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "product_seconds", _fake_products({torch.float32: 1.0, torch.bfloat16: 1.75}, []))
    spec = "dim=256,depth=1,heads=2,image_size=28"
    result = cli("run", SAMPLES / "rocket.jpg", "-o", tmp_path / "a.h5", "--model", spec, "--workers", "0", "--json")
    import json

    summary = json.loads(result.stdout)
    assert summary["compute_dtype"] == "float32" and summary["dtype_reason"].startswith("float32: bf16 ran at 0.57×")
    shown = cli("run", SAMPLES / "rocket.jpg", "-o", tmp_path / "b.h5", "--model", spec, "--workers", "0")
    assert "auto → float32: bf16 ran at 0.57× float32's matrix-product speed, measured earlier" in shown.stdout
    named = json.loads(cli("run", SAMPLES / "rocket.jpg", "-o", tmp_path / "c.h5", "--model", spec, "--workers", "0",
                           "--dtype", "float32", "--json").stdout)
    assert named["dtype_reason"] is None


@pytest.mark.parametrize("supported, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cuda_follows_the_cards_bf16_support(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert devices.resolve_dtype("auto", torch.device("cuda", 0)) == expected


def test_an_unknown_dtype_is_one_line():
    with pytest.raises(vitcore.VitExtractError, match="unknown dtype 'fp8'"):
        devices.resolve_dtype("fp8", torch.device("cpu"))


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    save_tiny_qwen3vl(root / "qwen3-vl")
    save_tiny_qwen2vl(root / "qwen2.5-vl", "2.5")
    save_tiny_qwen2vl(root / "qwen2-vl", "2")
    return {"seed": dict(model=TINY), **{name: dict(weights=str(root / name))
                                         for name in ("qwen3-vl", "qwen2.5-vl", "qwen2-vl")}}


@pytest.mark.parametrize("family", ["seed", "qwen3-vl", "qwen2.5-vl", "qwen2-vl"])
def test_bf16_tokens_are_the_float32_tokens_to_bf16s_rounding(encoders, tmp_path, family):
    """bf16 computes with 8 significant bits (u = 2⁻⁸) and float32 accumulation: each image's tokens
    are within 4u of the float32 tokens, relative (measured 1.3u to 1.9u on these tiny encoders),
    and not equal to them (bf16 really ran)."""
    tokens = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.h5"
        result = vitcore.extract([SAMPLES], out, dtype=dtype, out_dtype="float32", workers=0, **encoders[family])
        assert result.compute_dtype == dtype
        with vitcore.open_tokens(out) as f:
            assert f.settings["compute_dtype"] == dtype
            tokens[dtype] = {k: f[k].astype(np.float64) for k in f.keys}
    assert tokens["float32"].keys() == tokens["bfloat16"].keys() and len(tokens["float32"]) == 8
    for key, reference in tokens["float32"].items():
        error = np.linalg.norm(tokens["bfloat16"][key] - reference) / np.linalg.norm(reference)
        assert BF16_UNIT_ROUNDOFF / 10 < error < 4 * BF16_UNIT_ROUNDOFF, (key, error)


def test_auto_resuming_a_file_keeps_the_dtype_it_was_made_with(monkeypatch, tmp_path):
    """A measurement that comes out otherwise on a later day must not make --resume refuse the file."""
    from vitcore.system import calibrate

    monkeypatch.setenv("VIT_EXTRACT_CACHE_DIR", str(tmp_path / "cache"))
    spec = "dim=256,depth=1,heads=2,image_size=28"
    out = tmp_path / "t.h5"
    monkeypatch.setattr(calibrate, "product_seconds", _fake_products({torch.float32: 1.0, torch.bfloat16: 2.0}, []))
    first = vitcore.extract([SAMPLES / "rocket.jpg"], out, model=spec, workers=0)
    assert first.compute_dtype == "float32"
    (tmp_path / "cache" / "dtype.json").unlink()  # measured again, and now bf16 looks faster
    monkeypatch.setattr(calibrate, "product_seconds", _fake_products({torch.float32: 1.0, torch.bfloat16: 0.5}, []))
    resumed = vitcore.extract([SAMPLES], out, model=spec, workers=0, resume=True)
    assert resumed.compute_dtype == "float32" and resumed.dtype_reason == "float32: as the file being resumed was computed"
    assert resumed.rows == 8


def test_float16_named_on_a_cpu_that_emulates_it_is_said_with_what_is_faster():
    from vitcore.system.calibrate import slow_half_note

    def timed(seconds):
        return lambda dtype, rows, width: seconds[dtype]

    emulated = {torch.float32: 1.0, torch.float16: 5.0, torch.bfloat16: 0.5}
    note = slow_half_note(384, timed(emulated))
    assert "0.20× float32's speed" in note and "bfloat16" in note
    assert "float32 is faster" in slow_half_note(384, timed({**emulated, torch.bfloat16: 2.0}))
    assert slow_half_note(384, timed({**emulated, torch.float16: 1.1})) is None  # native float16: no note
