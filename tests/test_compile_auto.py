"""--compile auto: compiled where measured to pay, from the run's own batches or remembered times."""

import json
import os

import h5py
import numpy as np
import pytest

import vitcore
from cli.main import _bare_compile
from tests.helpers import TINY
from vitcore.errors import UsageError
from vitcore.run import compile_choice
from vitcore.run.pipeline import ExtractOptions

# batch 1 over 8 pictures: the trial takes full batches 1-7, the chosen mode runs the 8th
AUTO = ExtractOptions(model=TINY, out_dtype="float32", dtype="float32", device="cpu", workers=0, batch_size=1)


def _tokens(path):
    with h5py.File(path, "r") as f:
        return list(f["paths"].asstr()[:]), f["tokens"][:]


def _remembered() -> dict:
    path = os.path.join(os.environ["VIT_EXTRACT_CACHE_DIR"], compile_choice.CACHE_FILE)
    with open(path) as handle:
        return json.load(handle)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A cache folder of its own: nothing remembered (inductor's cache stays the session's)."""
    monkeypatch.setenv("VIT_EXTRACT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def eager_tokens(photos, tmp_path):
    return _tokens(vitcore.extract([photos], tmp_path / "eager.h5", AUTO, compile="off").output)


@pytest.mark.parametrize("margin, kept", [(0.0, "compiled"), (1e9, "eager")])
def test_a_long_run_measures_keeps_the_faster_and_remembers(photos, tmp_path, fresh_cache, eager_tokens, monkeypatch,
                                                            margin, kept):
    monkeypatch.setattr(compile_choice, "TRIAL_COMPILE_SECONDS", 0.0)  # any run is long enough to try
    monkeypatch.setattr(compile_choice, "MARGIN", margin)  # 0: compiled always wins; 1e9: never
    result = vitcore.extract([photos], tmp_path / "auto.h5", AUTO)
    assert result.complete and result.compile_reason.startswith(f"{kept}: ")
    assert "measured in this run" in result.compile_reason
    assert 0 < result.timings["compile"] <= result.timings["compute"]  # the 5th batch compiled either way
    (entry,) = _remembered().values()
    assert entry["eager"] > 0 and entry["compiled"] > 0 and entry["compile_seconds"] >= 0
    keys, tokens = _tokens(result.output)
    assert keys == eager_tokens[0]
    np.testing.assert_allclose(tokens, eager_tokens[1], rtol=1e-5, atol=1e-5)  # eager and compiled rows alike


def test_a_short_run_stays_eager_and_measures_nothing(photos, tmp_path, fresh_cache):
    result = vitcore.extract([photos], tmp_path / "auto.h5", AUTO)  # 8 tiny pictures: far from paying
    assert result.complete and result.compile_reason is None and "compile" not in result.timings
    assert not os.path.exists(os.path.join(os.environ["VIT_EXTRACT_CACHE_DIR"], compile_choice.CACHE_FILE))


@pytest.mark.parametrize("compiled_seconds, compile_seconds, expect", [
    (0.001, 0.0, "compiled"),  # faster, and the compilation paid for in a few images
    (0.001, 1e6, "eager"),  # faster, but not by enough over 8 pictures to repay the compilation
    (10.0, 0.0, "eager"),  # slower
])
def test_remembered_times_decide_from_the_first_batch(photos, tmp_path, fresh_cache, eager_tokens, monkeypatch,
                                                      compiled_seconds, compile_seconds, expect):
    monkeypatch.setattr(compile_choice, "TRIAL_COMPILE_SECONDS", 0.0)
    keys = []
    monkeypatch.setattr(compile_choice, "_remembered", lambda key: keys.append(key) or compile_choice.Measured(
        eager=1.0, compiled=compiled_seconds, compile_seconds=compile_seconds))
    result = vitcore.extract([photos], tmp_path / "auto.h5", AUTO)
    assert result.compile_reason.startswith(f"{expect}: ") and "measured earlier" in result.compile_reason
    assert len(keys) == 1 and "torch " in keys[0] and "float32" in keys[0] and "batch 1" in keys[0]
    assert ("compile" in result.timings) == (expect == "compiled")  # compiled from the first batch, or never
    np.testing.assert_allclose(_tokens(result.output)[1], eager_tokens[1], rtol=1e-5, atol=1e-5)
    if expect == "compiled":  # its compilation time now is remembered for the next run
        (entry,) = _remembered().values()
        assert entry["compile_seconds"] == round(result.timings["compile"], 2)


def test_other_families_run_eager_under_auto_and_refuse_on(photos, tmp_path):
    with pytest.raises(UsageError, match="--compile on works with the seed encoders"):
        vitcore.extract([photos], tmp_path / "q.h5", AUTO, model="qwen3-vl", weights=str(tmp_path), compile="on")
    with pytest.raises(UsageError, match="--compile 'sometimes' is not one of auto, on, off"):
        vitcore.extract([photos], tmp_path / "q.h5", AUTO, compile="sometimes")


def test_compile_alone_on_the_command_line_means_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()  # an input that is there: not the value
    assert _bare_compile(["run", "--compile", "photos"]) == ["run", "--compile=on", "photos"]
    assert _bare_compile(["run", "photos", "--compile"]) == ["run", "photos", "--compile=on"]
    assert _bare_compile(["run", "--compile", "--json"]) == ["run", "--compile=on", "--json"]
    for mode in ("auto", "on", "off"):
        assert _bare_compile(["run", "--compile", mode, "x"]) == ["run", "--compile", mode, "x"]
    assert _bare_compile(["run", "--compile", "yes", "a/b"]) == ["run", "--compile", "yes", "a/b"]  # a value: refused
