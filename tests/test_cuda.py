"""The GPU paths, checked on a CUDA device: each check of bench/cuda_check.py as a test marked
`cuda` (skipped without a GPU; `pytest -m cuda` runs only these)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "cuda_check.py"


def _checks():
    spec = importlib.util.spec_from_file_location("cuda_check", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHECK_NAMES = ["seed_encoder", "packed_attention", "end_to_end", "qwen3vl_end_to_end", "copy_stream", "gpu_decode_check"]


def test_every_check_of_the_script_is_a_test():
    assert [run.__name__ for run in _checks().CHECKS] == CHECK_NAMES


@pytest.mark.cuda
@pytest.mark.parametrize("name", CHECK_NAMES)
def test_cuda_check(name, capsys):
    checks = _checks()
    checks.failures = 0
    getattr(checks, name)()
    printed = capsys.readouterr().out
    assert checks.failures == 0, printed
    assert "PASS" in printed
