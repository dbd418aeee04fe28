"""Weights digests remembered per file identity (system/cache.py): an unchanged file is not read
again; any write, replacement or touch makes it hashed again, so a resume still refuses other weights."""

import os

import pytest

import vitcore
from tests.helpers import TINY
from vitcore.encoders.seed.weights import file_sha256
from vitcore.errors import ResumeMismatchError
from vitcore.run.pipeline import ExtractOptions
from vitcore.system.cache import cached_digest


def _counting(value):
    calls = []

    def compute():
        calls.append(1)
        return value() if callable(value) else value
    return compute, calls


def test_a_digest_is_computed_once_per_file_identity(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"a" * 1000)
    compute, calls = _counting("first")
    assert cached_digest("test", [str(weights)], compute) == "first"
    assert cached_digest("test", [str(weights)], compute) == "first" and len(calls) == 1
    other, other_calls = _counting("other rule")
    assert cached_digest("another kind", [str(weights)], other) == "other rule" and len(other_calls) == 1

    stat = os.stat(weights)
    weights.write_bytes(b"b" * 1000)  # same size, and the modification time put back: ctime still moves
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again, again_calls = _counting("second")
    assert cached_digest("test", [str(weights)], again) == "second" and len(again_calls) == 1

    moved = tmp_path / "moved.bin"
    os.replace(weights, moved)  # another path: hashed again
    third, third_calls = _counting("third")
    assert cached_digest("test", [str(moved)], third) == "third" and len(third_calls) == 1


def test_a_file_written_while_it_is_hashed_is_not_remembered(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"a")

    def racing():
        weights.write_bytes(b"changed under the hash")
        return "stale"
    assert cached_digest("test", [str(weights)], racing) == "stale"
    compute, calls = _counting("fresh")
    assert cached_digest("test", [str(weights)], compute) == "fresh" and len(calls) == 1


def test_file_sha256_is_the_files_sha256_and_an_unwritable_cache_only_costs_time(tmp_path, monkeypatch):
    import hashlib

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(os.urandom(5000))
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert file_sha256(weights) == expected == file_sha256(weights)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("x")
    monkeypatch.setenv("VIT_EXTRACT_CACHE_DIR", str(blocked))
    assert file_sha256(weights) == expected


def test_resume_refuses_weights_rewritten_in_place(photos, tmp_path, cli):
    first, second = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    assert cli("init-weights", "--model", TINY, "-o", first, "--seed", "1").exit_code == 0
    assert cli("init-weights", "--model", TINY, "-o", second, "--seed", "2").exit_code == 0
    options = ExtractOptions(model=TINY, weights=str(first), dtype="float32", device="cpu", workers=0)
    out = tmp_path / "out.h5"
    vitcore.extract([photos / "coffee.jpg"], out, options)
    os.replace(second, first)  # other weights under the same name: the remembered digest must not be used
    with pytest.raises(ResumeMismatchError, match="weights"):
        vitcore.extract([photos], out, options, resume=True)
