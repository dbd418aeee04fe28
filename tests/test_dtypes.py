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
def test_auto_on_the_cpu_follows_the_cpus_bf16_support(monkeypatch, probes, flags, expected):
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
