"""extract() end to end through the library: stored rows equal direct encoding, failures, resume."""

import json
import os

import h5py
import numpy as np
import pytest
import torch

import vitcore
from tests.helpers import TINY
from vitcore.errors import Interrupted, OutputExistsError, ResumeMismatchError, UsageError
from vitcore.run.pipeline import ExtractOptions, StopFlag
from vitcore.encoders.seed.processor import PreprocessConfig, load_image, normalize_on_device
from vitcore.encoders.seed.weights import build_encoder

EXACT = ExtractOptions(model=TINY, out_dtype="float32", dtype="float32", device="cpu", workers=0, batch_size=3)


def _rows(path):
    with h5py.File(path, "r") as f:
        keys = list(f["paths"].asstr()[:])
        return keys, f["tokens"][:], dict(f.attrs)


def test_stored_tokens_equal_encoding_each_image_directly(photos, tmp_path):
    out = tmp_path / "out.h5"
    result = vitcore.extract(str(photos), out, EXACT)  # one path as a plain string
    model, _ = build_encoder(TINY)
    prep = PreprocessConfig(image_size=56)
    with vitcore.open_tokens(out) as f:
        assert len(f) == result.rows == 8 and result.complete
        for key in f.keys:
            pixels, size = load_image(str(photos / key), prep)
            x = normalize_on_device(torch.from_numpy(pixels.copy())[None], prep.mean, prep.std, torch.float32)
            expected = model(x).tokens[0].numpy()
            np.testing.assert_allclose(f[key], expected, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(f.mean(key), expected.mean(0), rtol=1e-5, atol=1e-5)
            assert tuple(f.h5["image_size"][f.index(key)]) == size
            assert f.original_path(key) == str(photos / key) and open(f.original_path(key), "rb").read()


def test_a_failed_image_has_no_row_and_moves_no_other_row(photos, tmp_path):
    clean = tmp_path / "clean.h5"
    vitcore.extract([photos], clean, EXACT)
    (photos / "b_broken.jpg").write_bytes(b"this is not a jpeg")
    (photos / "d_truncated.png").write_bytes((photos / "alpha_cutout.png").read_bytes()[:3000])
    dirty = tmp_path / "dirty.h5"
    result = vitcore.extract([photos], dirty, EXACT)
    assert sorted(k for k, _ in result.failures) == ["b_broken.jpg", "d_truncated.png"]
    clean_keys, clean_tokens, _ = _rows(clean)
    keys, tokens, attrs = _rows(dirty)
    assert keys == clean_keys and attrs["committed"] == 8 and attrs["failed_committed"] == 2
    np.testing.assert_array_equal(tokens, clean_tokens)
    with vitcore.open_tokens(dirty) as f:
        reasons = dict(f.failures)
    assert set(reasons) == {"b_broken.jpg", "d_truncated.png"}
    assert all(reason and "\n" not in reason for reason in reasons.values())


def test_resume_after_an_interruption_equals_one_full_run(photos, tmp_path):
    full = tmp_path / "full.h5"
    vitcore.extract([photos], full, EXACT)
    part = tmp_path / "part.h5"
    stop = StopFlag()
    with pytest.raises(Interrupted) as caught:
        vitcore.extract([photos], part, EXACT, stop=stop, progress=lambda p: p.done >= 3 and stop.set())
    assert caught.value.exit_code == 130
    keys, _, attrs = _rows(part)
    assert attrs["committed"] == 3 and not attrs["complete"] and len(keys) == 3
    result = vitcore.extract([photos], part, EXACT, resume=True)
    assert result.skipped == 3 and result.written == 5 and result.complete
    full_keys, full_tokens, _ = _rows(full)
    keys, tokens, attrs = _rows(part)
    assert keys == full_keys and attrs["complete"]
    np.testing.assert_array_equal(tokens, full_tokens)  # batch boundaries coincide: bit-identical


def test_resume_discards_rows_past_the_committed_counter(photos, tmp_path):
    full = tmp_path / "full.h5"
    vitcore.extract([photos], full, EXACT)
    part = tmp_path / "part.h5"
    stop = StopFlag()
    with pytest.raises(Interrupted):
        vitcore.extract([photos], part, EXACT, stop=stop, progress=lambda p: stop.set())
    with h5py.File(part, "r+") as f:  # a crash after writing rows but before the commit
        n = f.attrs["committed"]
        for name in ("tokens", "mean", "paths", "root_index", "image_size"):
            f[name].resize(n + 2, axis=0)
        f["tokens"][n:] = 7.0
        f["paths"][n:] = ["ghost-a.jpg", "ghost-b.jpg"]
    vitcore.extract([photos], part, EXACT, resume=True)
    full_keys, full_tokens, _ = _rows(full)
    keys, tokens, _ = _rows(part)
    assert keys == full_keys
    np.testing.assert_array_equal(tokens, full_tokens)


def test_resume_refuses_different_settings_and_names_the_difference(photos, tmp_path):
    out = tmp_path / "out.h5"
    vitcore.extract([photos], out, EXACT)
    for change, words in [({"pool": "mean"}, "pooling"), ({"seed": 1}, "weights"),
                          ({"resize": "crop"}, "preprocessing"), ({"out_dtype": "float16"}, "--out-dtype"),
                          ({"layers": (-2,)}, "--layer")]:
        with pytest.raises(ResumeMismatchError, match=words):
            vitcore.extract([photos], out, EXACT, resume=True, **change)
    with pytest.raises(ResumeMismatchError, match="preprocessing setting differs \\(resize: file squash \\(--resize squash\\), this run crop\\)"):
        vitcore.extract([photos], out, EXACT, resume=True, resize="crop")  # a long record: the key that differs


def test_files_whose_encoder_record_predates_families_still_resume(photos, tmp_path):
    out = tmp_path / "out.h5"
    first = vitcore.extract([photos / "chelsea.jpg"], out, EXACT)
    with h5py.File(out, "r+") as f:  # as vit-extract wrote it before records named their family
        record = json.loads(f.attrs["encoder"])
        assert record.pop("family") == "seed"
        f.attrs["encoder"] = json.dumps(record, sort_keys=True)
    result = vitcore.extract([photos], out, EXACT, resume=True)
    assert first.rows == 1 and result.skipped == 1 and result.rows == 8 and result.complete
    with vitcore.open_tokens(out) as f:
        assert f.describe()["summary"]["encoder"].startswith("custom: dim 32, depth 2")
    with pytest.raises(ResumeMismatchError, match="the encoder setting differs"):
        vitcore.extract([photos], out, EXACT, model="dim=32,depth=1,heads=2,image_size=56", resume=True)


def test_an_existing_output_is_never_touched_without_resume_or_overwrite(photos, tmp_path):
    out = tmp_path / "out.h5"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="already exists and is not a vit-extract output"):
        vitcore.extract([photos], out, EXACT)
    assert out.read_bytes() == b"precious"
    vitcore.extract([photos], out, EXACT, overwrite=True)
    assert len(vitcore.open_tokens(out)) == 8


def test_layers_pooling_and_projector_datasets(photos, tmp_path):
    out = tmp_path / "layers.h5"
    vitcore.extract([photos], out, EXACT, layers=(-1, 0, 1, 0))  # 1 and -1 name the same block
    with h5py.File(out, "r") as f:
        assert sorted(f["layers"]) == ["-1", "0", "1"] and f["layers/0"].shape == (8, 16, 32)
        assert json.loads(f.attrs["layers"]) == [-1, 0, 1]
        np.testing.assert_array_equal(f["layers/1"][:], f["layers/-1"][:])
        last = torch.from_numpy(f["layers/-1"][:])
        model, _ = build_encoder(TINY)
        normed = torch.nn.functional.layer_norm(last, (32,), model.norm.weight, model.norm.bias, 1e-6)
        np.testing.assert_allclose(normed.numpy(), f["tokens"][:], rtol=1e-4, atol=1e-4)
    pooled = tmp_path / "pooled.h5"
    vitcore.extract([photos], pooled, EXACT, pool="max", project_dim=24, layers=(-2,))
    with h5py.File(pooled, "r") as f:
        assert f["tokens"].shape == (8, 24) and "mean" not in f and f["layers/-2"].shape == (8, 32)
        assert json.loads(f.attrs["projector"]) == {"dim": 24} and f.attrs["pooling"] == "max"


def test_worker_processes_give_the_same_rows_as_in_process_decoding(photos, tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    vitcore.extract([photos], a, EXACT)
    vitcore.extract([photos], b, EXACT, workers=2)
    ka, ta, _ = _rows(a)
    kb, tb, attrs = _rows(b)
    assert ka == kb and attrs["complete"]
    np.testing.assert_array_equal(ta, tb)


def test_progress_callback_and_empty_inputs(photos, tmp_path):
    seen = []
    vitcore.extract([photos], tmp_path / "p.h5", EXACT, progress=seen.append)
    assert [p.done for p in seen] == [0, 3, 6, 8] and all(p.total == 8 for p in seen)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(UsageError, match="no images found.*--ext"):
        vitcore.extract([empty], tmp_path / "e.h5", EXACT)
    assert not (tmp_path / "e.h5").exists()


def test_resume_recognises_the_same_file_however_it_was_named(photos, tmp_path, monkeypatch):
    out = tmp_path / "out.h5"
    monkeypatch.chdir(photos.parent)
    vitcore.extract(["photos/coffee.jpg", "./photos/rocket.jpg"], out, EXACT)
    listed = tmp_path / "list.txt"
    listed.write_text(f"{photos}/coffee.jpg\nphotos/../photos/rocket.jpg\n")
    again = vitcore.extract([photos], out, EXACT, files_from=str(listed), resume=True)
    assert again.skipped == 2 and again.written == 6
    keys, _, attrs = _rows(out)
    assert len(keys) == 8 == attrs["committed"]


def test_a_writer_error_is_final(tmp_path):
    """A write that fails surfaces at the next put and again at close, never forgotten; the batches
    queued behind it are not written but their buffers go back. Driven by events, not sleeps."""
    import threading

    from vitcore.store import AsyncWriter, WriteError

    inside, go = threading.Event(), threading.Event()

    class Failing:
        calls = 0
        committed = 0

        def append(self, rows):
            Failing.calls += 1
            inside.set()
            go.wait(30)  # held until the test has queued batches behind this one
            raise WriteError("x.h5", 0, OSError(28, "No space left on device"))

        def close(self, complete):
            self.closed_complete = complete

    released = []

    drained = threading.Event()

    class Batch:  # stands in for Rows: only its buffers' release is looked at after an error
        def __init__(self, name):
            self.release = lambda: (released.append(name), name == "later 1" and drained.set())

    writer = Failing()
    async_writer = AsyncWriter(writer)
    async_writer.put(Batch("batch 1"))
    assert inside.wait(30)  # the writer thread is in its (failing) write
    async_writer.put(Batch("later 0"))  # queued behind it: accepted, the error is not known yet
    async_writer.put(Batch("later 1"))
    go.set()
    assert drained.wait(30)  # the writer has failed and handed back the batches queued behind
    with pytest.raises(WriteError, match="the disk is full"):  # the error surfaces at the next put…
        async_writer.put(Batch("after"))
    with pytest.raises(WriteError):  # …and again at close: it is never forgotten
        async_writer.close(True)
    assert Failing.calls == 1 and writer.closed_complete is False
    assert released == ["later 0", "later 1"]  # not written, but their buffers go back


def test_compile_gives_the_eager_tokens_and_reports_its_compilation_time(photos, tmp_path):
    eager = tmp_path / "eager.h5"
    vitcore.extract([photos], eager, EXACT, layers=(0,))
    compiled = tmp_path / "compiled.h5"
    result = vitcore.extract([photos], compiled, EXACT, layers=(0,), compile=True)
    assert result.complete and 0 < result.timings["compile"] <= result.timings["compute"]
    keys, tokens, _ = _rows(compiled)
    ref_keys, ref_tokens, _ = _rows(eager)
    assert keys == ref_keys
    np.testing.assert_allclose(tokens, ref_tokens, rtol=1e-5, atol=1e-5)  # 8 images: batches of 3, 3 and 2
    with h5py.File(compiled) as f, h5py.File(eager) as g:
        np.testing.assert_allclose(f["layers/0"][:], g["layers/0"][:], rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match="--compile on works with the seed encoders"):
        vitcore.extract([photos], tmp_path / "q.h5", EXACT, model="qwen3-vl", weights=str(tmp_path), compile=True)


def test_tokens_that_overflow_float16_are_counted_in_a_warning(photos, tmp_path):
    from vitcore.encoders.seed.weights import save_weights

    encoder, _ = build_encoder(TINY, seed=0)
    with torch.no_grad():
        encoder.norm.weight.mul_(1e6)  # the final norm's outputs reach ~1e6, past float16's 65504
    weights = tmp_path / "loud.safetensors"
    save_weights(encoder, weights)
    half = vitcore.extract([photos], tmp_path / "half.h5", weights=str(weights), workers=0, batch_size=3,
                           dtype="float32")
    full = vitcore.extract([photos], tmp_path / "full.h5", weights=str(weights), workers=0, out_dtype="float32",
                           dtype="float32")
    assert f"{half.rows} images have token values that are not finite" in " ".join(half.warnings)
    assert "--out-dtype float32" in " ".join(half.warnings)
    assert not any("finite" in w for w in full.warnings)
    with h5py.File(tmp_path / "half.h5") as f:
        assert np.isinf(f["tokens"][:]).reshape(half.rows, -1).any(axis=1).all()


class _LateCopy:
    """Stands in for a CUDA copy's event: the values reach the host buffer only when waited for."""

    def __init__(self, buffer: np.ndarray, values: np.ndarray):
        self.buffer, self.values, self.waited = buffer, values, False

    def synchronize(self) -> None:
        self.buffer[...] = self.values
        self.waited = True


def test_the_writer_waits_for_a_copy_in_flight_before_reading_its_rows(tmp_path):
    from vitcore.store import ArraySpec, Rows, StoreSettings, StoreWriter

    settings = StoreSettings(
        encoder="{}", weights="{}", preprocessing="{}", pooling="none", projector="null",
        compute_dtype="float32", device="cuda", out_dtype="float16", arrays=(ArraySpec("tokens", (4, 8)),),
    )
    out = tmp_path / "out.h5"
    StoreWriter.prepare(str(out), settings, [str(tmp_path)], False)
    writer = StoreWriter.reopen(str(out), settings)
    values = np.arange(2 * 4 * 8, dtype=np.float16).reshape(2, 4, 8)
    values[1, 0, 0] = np.inf
    buffer = np.zeros_like(values)  # what the host buffer holds while the copy is in flight
    copy = _LateCopy(buffer, values)
    rows = Rows(keys=["a.jpg", "b.jpg"], root_index=np.zeros(2, np.int32), image_size=np.ones((2, 2), np.int32),
                arrays={"tokens": buffer, "mean": buffer.astype(np.float16).mean(axis=1)}, nonfinite=np.int64(1),
                ready=copy)
    given_back = []
    rows.release = lambda: given_back.append(True)
    writer.append(rows)
    writer.close(True)
    assert copy.waited and given_back == [True]  # the buffers are reused once written
    assert writer.nonfinite_rows == 1  # the count made beside the tokens, not a scan of the buffer
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["tokens"][:], values)


def test_retry_failed_decodes_recorded_failures_again_and_records_only_what_fails_again(photos, tmp_path):
    chelsea = (photos / "chelsea.jpg").read_bytes()
    (photos / "b_broken.jpg").write_bytes(b"this is not a jpeg")
    (photos / "d_broken.jpg").write_bytes(b"nor is this")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "e_broken.jpg").write_bytes(b"nor this")
    out = tmp_path / "out.h5"
    first = vitcore.extract([photos, elsewhere], out, EXACT)
    assert first.rows == 8 and len(first.failures) == 3
    (photos / "b_broken.jpg").write_bytes(chelsea)  # mended after the run
    plain = vitcore.extract([photos], out, EXACT, resume=True)
    assert plain.written == 0 and plain.skipped == 10  # a plain resume leaves recorded failures alone
    retried = vitcore.extract([photos], out, EXACT, resume=True, retry_failed=True)
    assert retried.skipped == 8 and retried.written == 1 and [k for k, _ in retried.failures] == ["d_broken.jpg"]
    keys, tokens, attrs = _rows(out)
    assert attrs["committed"] == 9 and attrs["failed_committed"] == 2
    with vitcore.open_tokens(out) as f:
        # e_broken.jpg was not among this run's inputs: its record stays; d_broken.jpg's is not doubled.
        assert [k for k, _ in f.failures] == ["e_broken.jpg", "d_broken.jpg"]
        np.testing.assert_array_equal(f["b_broken.jpg"], f["chelsea.jpg"])
    again = vitcore.extract([photos, elsewhere], out, EXACT, resume=True)
    assert again.written == 0 and again.skipped == 11
    with pytest.raises(UsageError, match="--retry-failed goes with --resume"):
        vitcore.extract([photos], tmp_path / "new.h5", EXACT, retry_failed=True)


def test_original_path_is_a_str_that_opens_the_file_whatever_its_name(tmp_path):
    """A name that is not UTF-8 (Latin-1 é) comes back as the str open() takes (surrogate escapes)."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    raw = os.path.join(os.fsencode(folder), b"caf\xe9.png")
    Image.new("RGB", (20, 20), (1, 2, 3)).save(os.fsdecode(raw), format="PNG")
    out = tmp_path / "o.h5"
    vitcore.extract([folder], out, EXACT)
    with vitcore.open_tokens(out) as f:
        path = f.original_path(0)
        assert isinstance(path, str) and os.fsencode(path) == raw
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
