"""The Qwen3-VL vision tower against transformers (the oracle): preprocessing, encoder, checkpoint reading."""

from __future__ import annotations

import builtins
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import transformers  # a test dependency (pip install -e '.[test]'): the oracle
from PIL import Image

from tests.helpers import BACKENDS, SAMPLES, qwen3vl_processor, resave_single_file, save_tiny_qwen3vl
from vitcore.errors import WeightsError
from vitcore.encoders.qwen.qwen3vl import load_qwen3vl
from vitcore.encoders.qwen.processor import QwenVLPreprocess, patchify_torch, resize_rgb, smart_resize


def _processor(min_pixels=65536, max_pixels=16777216, backend="pil"):
    return qwen3vl_processor(min_pixels, max_pixels, backend)


def _patches(image, prep):
    """vit-extract's preprocessing of one picture → (patches (h·w, 3·T·p·p), grid)."""
    return patchify_torch(torch.from_numpy(resize_rgb(image, prep)), prep)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Qwen3-VL saved as a real checkpoint: sharded, with an index file."""
    folder = tmp_path_factory.mktemp("qwen3vl") / "ckpt"
    return folder, save_tiny_qwen3vl(folder)


def _images():
    rng = np.random.default_rng(0)
    noise = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    return {
        "square": Image.open(SAMPLES / "astronaut.jpg").convert("RGB"),
        "wide": Image.open(SAMPLES / "rocket.jpg").convert("RGB").resize((700, 180)),
        "tall": noise(120, 500),
        "small": noise(20, 17),
        "extreme": noise(1500, 12),
        "over_max": Image.open(SAMPLES / "retina.jpg").convert("RGB"),  # 1024² > max_pixels 200k
    }


SAMPLE_FILES = sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".jpg", ".png"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_images()) + SAMPLE_FILES)
def test_preprocessing_equals_the_processor_of_the_same_backend_bit_for_bit(name, backend):
    image = _images()[name] if name in _images() else Image.open(SAMPLES / name).convert("RGB")
    reference = _processor(max_pixels=200_000, backend=backend)(images=[image], return_tensors="pt")
    prep = QwenVLPreprocess(max_pixels=200_000, backend=backend)
    patches, grid = _patches(image, prep)
    assert list(grid) == reference["image_grid_thw"][0].tolist()
    assert torch.equal(patches, reference["pixel_values"])


# nearest, lanczos, bilinear, box, hamming (bicubic, the default: above); transformers' torchvision
# backend has no box or hamming (vit-extract refuses them with it: test_processor_choice_is_recorded…).
@pytest.mark.parametrize("backend, resample", [(b, r) for b in BACKENDS for r in (0, 1, 2, 4, 5)
                                               if not (b == "torchvision" and r in (4, 5))])
def test_every_filter_a_checkpoint_may_name_equals_its_backend(backend, resample):
    image = _images()["tall"]
    prep = QwenVLPreprocess(max_pixels=200_000, backend=backend, resample=resample)
    processor = _processor(max_pixels=200_000, backend=backend)
    reference = processor(images=[image], resample=resample, return_tensors="pt")
    patches, grid = _patches(image, prep)
    assert list(grid) == reference["image_grid_thw"][0].tolist()
    assert torch.equal(patches, reference["pixel_values"])


@pytest.mark.parametrize("name", ["tall", "extreme", "over_max"])
def test_the_two_backends_differ_where_the_picture_is_resized(name):
    """The reason the choice exists: on noise and hard edges the two resize kernels disagree."""
    image = _images()[name]
    pil, torchvision = (_patches(image, QwenVLPreprocess(max_pixels=200_000, backend=b))[0] for b in BACKENDS)
    assert pil.shape == torchvision.shape
    assert (pil - torchvision).abs().max() > 0.5 / 127.5  # at least a grey level apart somewhere (not rounding)


def test_smart_resize_rules():
    assert smart_resize(224, 224, 32, 65536, 16777216) == (256, 256)  # up to min_pixels
    assert smart_resize(48, 80, 32, 0, 10**9) == (64, 64)  # round half to even: 48/32 = 1.5 → 2, 80/32 = 2.5 → 2
    h, w = smart_resize(4000, 3000, 32, 65536, 1_000_000)
    assert h * w <= 1_000_000 and h % 32 == 0 and w % 32 == 0
    with pytest.raises(ValueError):
        smart_resize(10, 2500, 32, 0, 10**9)


def _reference(visual, images, backend="pil"):
    batch = _processor(max_pixels=200_000, backend=backend)(images=images, return_tensors="pt")
    with torch.no_grad():
        out = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    return out, [tuple(g) for g in batch["image_grid_thw"].tolist()]


def _ours(encoder, prep, images):
    patches, grids = zip(*(_patches(img, prep) for img in images))
    with torch.no_grad():
        return encoder(torch.cat(patches), list(grids)), list(grids)


def _rel(a, b) -> float:
    return (torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double())).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("names", [["square"], ["wide"], ["tall"], ["small"], ["square", "wide", "tall", "small"]])
def test_encoder_matches_transformers_in_float32(checkpoint, names, backend):
    folder, visual = checkpoint
    encoder, prep = load_qwen3vl(str(folder))
    prep = dataclasses.replace(prep, backend=backend)
    images = [_images()[n] for n in names]
    ref, ref_grids = _reference(visual, images, backend)
    ours, grids = _ours(encoder, prep, images)
    assert grids == ref_grids
    assert ours.tokens.shape == ref.pooler_output.shape
    assert _rel(ours.tokens, ref.pooler_output) < 1e-4
    assert _rel(ours.last_hidden, ref.last_hidden_state) < 1e-4
    assert len(ours.deepstack) == len(ref.deepstack_features) == 3
    for a, b in zip(ours.deepstack, ref.deepstack_features):
        assert _rel(a, b) < 1e-4


def test_encoder_alone_on_identical_pixel_values(checkpoint):
    folder, visual = checkpoint
    encoder, _ = load_qwen3vl(str(folder))
    grid = torch.tensor([[1, 6, 10], [1, 4, 4]])
    pixels = torch.randn(int((grid[:, 1] * grid[:, 2]).sum()), 1536, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = visual(pixels, grid_thw=grid)
        ours = encoder(pixels, [tuple(g) for g in grid.tolist()])
    assert _rel(ours.tokens, ref.pooler_output) < 1e-4


@pytest.mark.parametrize("grid", [[[2, 6, 10]], [[3, 4, 4], [1, 6, 10], [2, 8, 6]]])
def test_video_grids_attend_within_each_temporal_slice_as_transformers(checkpoint, grid):
    """t > 1 (a video's temporal patches): positions repeat per slice and no slice attends to another."""
    folder, visual = checkpoint
    encoder, _ = load_qwen3vl(str(folder))
    grid = torch.tensor(grid)
    pixels = torch.randn(int(grid.prod(dim=1).sum()), 1536, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = visual(pixels, grid_thw=grid)
        ours = encoder(pixels, [tuple(g) for g in grid.tolist()])
    assert _rel(ours.tokens, ref.pooler_output) < 1e-4
    for a, b in zip(ours.deepstack, ref.deepstack_features):
        assert _rel(a, b) < 1e-4


def test_loading_reads_only_the_vision_tensors(checkpoint, monkeypatch):
    folder, _ = checkpoint
    with open(folder / "model.safetensors.index.json") as handle:
        weight_map = json.load(handle)["weight_map"]
    vision_shards = {s for n, s in weight_map.items() if n.startswith("model.visual.")}
    language_only = set(weight_map.values()) - vision_shards
    assert language_only, "the fixture should have shards holding only language-model tensors"
    opened = []
    real_open = builtins.open

    def spy(path, *args, **kwargs):
        opened.append(os.path.basename(os.fspath(path)))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    encoder, _ = load_qwen3vl(str(folder))
    assert not language_only & set(opened)
    assert vision_shards <= set(opened)
    assert sum(p.numel() for p in encoder.parameters()) == sum(
        int(np.prod(v)) for v in _shapes(folder, vision_shards).values()
    )


def _shapes(folder, shards) -> dict:
    from safetensors import safe_open

    out = {}
    for shard in shards:
        with safe_open(str(folder / shard), "pt") as handle:
            out.update({k: handle.get_slice(k).get_shape() for k in handle.keys() if k.startswith("model.visual.")})
    return out


def test_a_single_file_checkpoint_and_clear_errors(checkpoint, tmp_path):
    folder, visual = checkpoint
    single = tmp_path / "single"
    transformers.Qwen3VLForConditionalGeneration.from_pretrained(folder).save_pretrained(single, max_shard_size="1GB")
    assert (single / "model.safetensors").exists()
    with pytest.raises(WeightsError, match="no preprocessor_config.json .*transformers cannot load it either"):
        load_qwen3vl(str(single))  # the model alone was saved there: its image processor is unknown
    (single / "preprocessor_config.json").write_bytes((folder / "preprocessor_config.json").read_bytes())
    encoder, prep = load_qwen3vl(str(single))
    assert prep.max_pixels == 200_000
    image = [_images()["small"]]
    np.testing.assert_allclose(_ours(encoder, prep, image)[0].tokens, _ours(load_qwen3vl(str(folder))[0], prep, image)[0].tokens)
    with pytest.raises(WeightsError, match="no config.json"):
        load_qwen3vl(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(WeightsError, match="vision_config"):
        load_qwen3vl(str(tmp_path))


# -- through the pipeline and the command line --------------------------------------------------
@pytest.fixture
def folder_of_images(tmp_path):
    """Images of several sizes (native resolution packs them into one sequence per batch)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, image in _images().items():
        if name not in ("extreme", "over_max"):
            image.save(folder / f"{name}.png")
    return folder


def _reference_for(visual, path, backend="pil"):
    ref, _ = _reference(visual, [Image.open(path).convert("RGB")], backend)
    return ref


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_native_resolution_stores_what_transformers_computes(checkpoint, folder_of_images, tmp_path, cli, backend):
    folder, visual = checkpoint
    out = tmp_path / "q.h5"
    _processor(backend=backend)  # the reference's backend is installed (else skipped)
    result = cli("run", folder_of_images, "-o", out, "--weights", folder, "--features", "deepstack,last_hidden",
                 "--dtype", "float32", "--out-dtype", "float32", "--batch-size", "4", "--workers", "0", "--json",
                 "--processor", backend)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["token_shape"] == [-1, 48]  # the count varies per image, as info says
    import vitcore

    with vitcore.open_tokens(out) as f:
        assert f.ragged and f.token_shape == (-1, 48) and len(f) == 4
        assert f.settings["encoder"]["family"] == "qwen3-vl" and f.settings["compute_dtype"] == "float32"
        offsets, counts = f.h5["token_offset"][:], f.h5["num_tokens"][:]
        assert offsets[0] == 0 and all(offsets[1:] == np.cumsum(counts)[:-1])  # one slice per image
        assert json.loads(f.h5.attrs["preprocessing"])["backend"] == backend
        for key in f.keys:
            ref = _reference_for(visual, folder_of_images / key, backend)
            t, h, w = f.h5["grid_thw"][f.index(key)]
            assert f.token_grid(key) == (h // 2, w // 2) and f[key].shape == (h * w // 4, 48)
            assert _rel(torch.from_numpy(f[key]), ref.pooler_output) < 1e-4
            assert _rel(torch.from_numpy(f.feature("last_hidden", key)), ref.last_hidden_state) < 1e-4
            for j in range(3):
                assert _rel(torch.from_numpy(f.feature(f"deepstack_{j}", key)), ref.deepstack_features[j]) < 1e-4
            np.testing.assert_allclose(f.mean(key), f[key].mean(0), rtol=1e-5, atol=1e-6)
    info = cli("info", out)
    assert "qwen3-vl" in info.stdout and "varying × 48" in info.stdout
    assert cli("show", out, "-o", tmp_path / "sheet.png").exit_code == 0
    hits = json.loads(cli("similar", out, folder_of_images / "wide.png", "-k", "1", "--json").stdout)
    assert hits[0]["key"] == "wide.png" and hits[0]["score"] > 0.999


def test_fixed_resolution_pooling_resume_and_shards(checkpoint, folder_of_images, tmp_path):
    import vitcore
    from vitcore.errors import ResumeMismatchError, UsageError
    from vitcore.store.merge import merge
    from vitcore.run.shard import shard_path

    folder, visual = checkpoint
    opts = dict(weights=str(folder), dtype="float32", out_dtype="float32", workers=0, batch_size=2, processor="pil")
    fixed = tmp_path / "fixed.h5"
    vitcore.extract(folder_of_images, fixed, resolution="96", **opts)
    with vitcore.open_tokens(fixed) as f:
        assert not f.ragged and f.h5["tokens"].shape == (4, 9, 48)  # (96/16)² / 4 merged tokens each
        assert f.describe()["summary"]["preprocessing"] == ("resolution 96×96 (fixed), decode full, "
                                                            "processor pil (bicubic (Pillow))")
        processor = _processor(min_pixels=96 * 96, max_pixels=96 * 96)
        batch = processor(images=[Image.open(folder_of_images / "tall.png").convert("RGB").resize((96, 96), Image.Resampling.BICUBIC)], return_tensors="pt")
        with torch.no_grad():
            ref = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
        assert _rel(torch.from_numpy(f["tall.png"]), ref) < 1e-4
    pooled = tmp_path / "pooled.h5"
    vitcore.extract(folder_of_images, pooled, pool="mean", features=("deepstack",), **opts)
    with vitcore.open_tokens(pooled) as f:
        assert f.h5["tokens"].shape == (4, 48) and f.h5["features/deepstack_1"].shape == (4, 48)
    with pytest.raises(ResumeMismatchError, match="preprocessing"):
        vitcore.extract(folder_of_images, fixed, resolution="128", resume=True, **opts)
    with pytest.raises(UsageError, match="multiple of 32"):
        vitcore.extract(folder_of_images, tmp_path / "bad.h5", resolution="100", **opts)
    # Ragged shards merge into the same rows as one run.
    single = tmp_path / "single.h5"
    vitcore.extract(folder_of_images, single, **opts)
    out = tmp_path / "merged.h5"
    shards = [shard_path(str(out), i, 3) for i in range(3)]
    for i in range(3):
        vitcore.extract(folder_of_images, shards[i], shard=(i, 3), **opts)
    for virtual in (False, True):  # a copy (the default), and views over the shards
        merge(str(out), shards, virtual=virtual, overwrite=True)
        with vitcore.open_tokens(out) as a, vitcore.open_tokens(single) as b:
            assert a.keys == b.keys and a.h5["tokens"].is_virtual == virtual
            for key in a.keys:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5)
    # Resume after a partial run: the ragged rows past the commit are dropped and the rest appended.
    part = tmp_path / "part.h5"
    vitcore.extract([folder_of_images / "small.png"], part, **opts)
    import h5py

    with h5py.File(part, "r+") as f:  # a crash after writing a batch's rows, before its commit
        flat = f["tokens"].shape[0]
        f["tokens"].resize(flat + 50, axis=0)
        f["tokens"][flat:] = 9.0
        for name in ("token_offset", "num_tokens", "paths", "root_index", "image_size", "grid_thw", "mean"):
            f[name].resize(2, axis=0)
    vitcore.extract(folder_of_images, part, resume=True, **opts)
    with vitcore.open_tokens(part) as a, vitcore.open_tokens(single) as b:
        names = {os.path.basename(k): k for k in a.keys}  # small.png was named directly: its path as given
        assert sorted(names) == sorted(b.keys) and len(a) == 4
        for name, key in names.items():
            np.testing.assert_allclose(a[key], b[name], rtol=1e-4, atol=1e-5)


def test_the_attention_backend_is_chosen_once_and_a_fallback_is_reported(checkpoint, monkeypatch):
    from vitcore.encoders.qwen import layers as qwen3vl

    folder, _ = checkpoint
    encoder, _ = load_qwen3vl(str(folder))
    backends = lambda: {id(m.backend) for m in encoder.modules() if isinstance(m, qwen3vl.Attention)}  # noqa: E731
    assert qwen3vl.choose_attention(encoder, torch.device("cpu"), torch.float32) == []  # exact per-image SDPA
    assert len(backends()) == 1  # one choice, shared by every block
    real = qwen3vl.attend_within_images

    def no_varlen(q, k, v, lengths, varlen=False):
        if varlen:
            raise RuntimeError("varlen_attn: no kernel for this GPU")
        return real(q, k, v, lengths)

    monkeypatch.setattr(qwen3vl, "attend_within_images", no_varlen)  # the probe fails, as on an older GPU
    notes = qwen3vl.choose_attention(encoder, torch.device("cuda"), torch.bfloat16)
    assert len(notes) == 1 and "variable-length attention is not available" in notes[0]
    assert "images attend one at a time" in notes[0]
    # A kernel that passed the probe but fails on a real batch: every block falls back, the run is told once.
    image = [_images()["small"], _images()["wide"]]
    prep = load_qwen3vl(str(folder))[1]
    expected = _ours(encoder, prep, image)[0].tokens
    backend = next(m.backend for m in encoder.modules() if isinstance(m, qwen3vl.Attention))
    backend.varlen, backend.notes[:] = True, []
    got = _ours(encoder, prep, image)[0].tokens
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not backend.varlen and len(backend.notes) == 1 and "no kernel for this GPU" in backend.notes[0]

    def out_of_memory(q, k, v, lengths, varlen=False):
        raise torch.OutOfMemoryError("CUDA out of memory (a fake device error)")

    monkeypatch.setattr(qwen3vl, "attend_within_images", out_of_memory)
    backend.varlen = True
    with pytest.raises(torch.OutOfMemoryError):  # memory is the batching path's to handle: not a fallback
        _ours(encoder, prep, image)
    assert backend.varlen and len(backend.notes) == 1


def test_a_checkpoint_folder_is_told_by_what_it_is(checkpoint, tmp_path):
    from vitcore.encoders import registry as families
    from vitcore.errors import UsageError

    folder, _ = checkpoint
    assert families.for_run(None, str(folder)).name == "qwen3-vl"  # config.json says model_type qwen3_vl
    with pytest.raises(UsageError, match="is a qwen3-vl checkpoint, and --model base is not qwen3-vl: drop --model"):
        families.for_run("base", str(folder))
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "vision_config": {}}))
    with pytest.raises(UsageError, match="not a checkpoint any encoder family reads.*model_type 'llama'"):
        families.for_run(None, str(other))
    with pytest.raises(UsageError, match="no readable config.json"):
        families.for_run(None, str(tmp_path / "llama" / ".."))


def test_similar_refuses_a_checkpoint_whose_processor_changed_since(checkpoint, folder_of_images, tmp_path):
    import shutil

    import vitcore
    from vitcore.errors import VitExtractError
    from vitcore.consumers.search import similar

    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint[0], folder)
    out = tmp_path / "q.h5"
    vitcore.extract(folder_of_images, out, weights=str(folder), dtype="float32", workers=0, batch_size=4)
    assert similar(str(out), str(folder_of_images / "wide.png"), k=1)[0][0].key == "wide.png"
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config["size"]["longest_edge"] = 100_000  # the weights' hash does not see this
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(VitExtractError, match="image processor of .* has changed since .*max_pixels"):
        similar(str(out), str(folder_of_images / "wide.png"), k=1)


# -- checkpoint folders as users have them ------------------------------------------------------
def _copy_checkpoint(folder, target):
    import shutil

    shutil.copytree(folder, target)
    return target


def test_vision_weights_under_either_prefix_are_the_same_weights(checkpoint, tmp_path):
    folder, _ = checkpoint
    renamed = resave_single_file(folder, tmp_path / "renamed")
    ours, prep = load_qwen3vl(str(renamed))
    reference, _ = load_qwen3vl(str(folder))
    assert ours.weights_sha256 == reference.weights_sha256  # the same weights: the same identity
    image = [_images()["wide"]]
    torch.testing.assert_close(_ours(ours, prep, image)[0].tokens, _ours(reference, prep, image)[0].tokens,
                               rtol=0, atol=0)


def _broken(folder, tmp_path, case):
    """A copy of the checkpoint broken the way public reports describe."""
    target = _copy_checkpoint(folder, tmp_path / case)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    vision_shard = index["weight_map"]["model.visual.blocks.0.attn.qkv.weight"]
    if case == "lfs pointer":
        (target / vision_shard).write_text("version https://git-lfs.github.com/spec/v1\n"
                                           "oid sha256:" + "0" * 64 + "\nsize 123456\n")
    elif case == "missing shard":
        (target / vision_shard).unlink()
    elif case == "truncated shard":
        data = (target / vision_shard).read_bytes()
        (target / vision_shard).write_bytes(data[: len(data) // 2])
    elif case == "not json":
        (target / "config.json").write_text('{"model_type": "qwen3_vl", "vision_config": {')
    elif case == "processor not json":
        (target / "preprocessor_config.json").write_text("{'patch_size': 16}")
    elif case == "deepstack past depth":
        config = json.loads((target / "config.json").read_text())
        config["vision_config"]["deepstack_visual_indexes"] = [0, 1, 3]  # depth 3: blocks 0..2
        (target / "config.json").write_text(json.dumps(config))
    elif case == "processor patch 14":
        prep = json.loads((target / "preprocessor_config.json").read_text())
        prep["patch_size"] = 14
        (target / "preprocessor_config.json").write_text(json.dumps(prep))
    elif case == "processor merge 1":
        prep = json.loads((target / "preprocessor_config.json").read_text())
        prep["merge_size"] = 1
        (target / "preprocessor_config.json").write_text(json.dumps(prep))
    assert len(shards) > 1
    return target


BROKEN = {
    "lfs pointer": "is a git-lfs pointer, not the weights: run git lfs pull",
    "missing shard": "is missing: model.safetensors.index.json names it",
    "truncated shard": "is truncated|cut short",
    "not json": "config.json is not valid JSON",
    "processor not json": "preprocessor_config.json is not valid JSON",
    "deepstack past depth": "deepstack_visual_indexes \\[0, 1, 3\\] name block 3, but the vision tower has 3 blocks",
    "processor patch 14": "processor's patch_size is 14 but the vision config's is 16",
    "processor merge 1": "processor's merge_size is 1 but the vision config's is 2",
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_checkpoint_folder_is_one_line_before_any_work(checkpoint, folder_of_images, tmp_path, cli, case):
    import re

    folder, _ = checkpoint
    broken = _broken(folder, tmp_path, case)
    out = tmp_path / "out.h5"
    result = cli("run", folder_of_images, "-o", out, "--weights", broken, "--model", "qwen3-vl", "--workers", "0")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert re.search(BROKEN[case], lines[0]), lines[0]
    assert not out.exists() and not (tmp_path / "out.h5.lock").exists()


def test_attention_within_an_image_goes_to_the_fused_kernel_as_4d_inputs(monkeypatch):
    """PyTorch's fused CPU kernel takes only 4-D inputs; 3-D ones fall back to building the whole
    N × N score matrix (4,096 patches, 16 heads: 1 GiB; bench/attention_memory.py measures it).
    So each image must reach it as a (1, H, n, Dh) batch, and the result is exact attention."""
    import torch.nn.functional as F

    from vitcore.encoders.qwen.layers import attend_within_images

    seen = []
    fused = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dim(), tuple(q.shape)))
        return fused(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 40, 8, generator=generator) for _ in range(3))
    lengths = [16, 9, 15]
    with torch.inference_mode():
        out = attend_within_images(q, k, v, lengths)
    assert seen == [(4, (1, 4, n, 8)) for n in lengths]  # one 4-D call per image
    expected, start = [], 0
    for n in lengths:  # each image attends only within itself (float64 reference)
        qs, ks, vs = (t[:, start:start + n].double() for t in (q, k, v))
        expected.append(torch.softmax(qs @ ks.transpose(1, 2) / 8 ** 0.5, dim=-1) @ vs)
        start += n
    torch.testing.assert_close(out.double(), torch.cat(expected, dim=1), rtol=0, atol=1e-5)


def test_cpu_packs_small_images_together_and_large_ones_alone(checkpoint, folder_of_images, tmp_path, monkeypatch):
    """On the CPU one packed sequence holds at most CPU_PACK_PATCHES patches: images that fit share
    a sequence, a larger one goes alone (a sequence of several large images only made every
    activation outgrow the allocator's reuse). Tokens are what transformers computes either way."""
    import vitcore
    from vitcore.encoders.qwen import family as qwenvl
    from vitcore.encoders.qwen.qwen3vl import Qwen3VLVisionEncoder

    folder, visual = checkpoint
    calls = []
    forward = Qwen3VLVisionEncoder.forward

    def spy(self, patches, grid_thw):
        calls.append([t * h * w for t, h, w in grid_thw])
        return forward(self, patches, grid_thw)

    monkeypatch.setattr(Qwen3VLVisionEncoder, "forward", spy)
    opts = dict(weights=str(folder), dtype="float32", out_dtype="float32", workers=0, batch_size=4, processor="pil")
    monkeypatch.setattr(qwenvl, "CPU_PACK_PATCHES", 10**9)
    vitcore.extract(folder_of_images, tmp_path / "whole.h5", **opts)
    (patches,) = calls  # 4 images under the limit: one sequence
    assert len(patches) == 4

    limit = min(a + b for a, b in zip(patches, patches[1:]))  # some neighbours fit together, never three
    monkeypatch.setattr(qwenvl, "CPU_PACK_PATCHES", limit)
    calls.clear()
    vitcore.extract(folder_of_images, tmp_path / "split.h5", **opts)
    assert [p for call in calls for p in call] == patches  # every image once, in order
    assert any(len(call) > 1 for call in calls) and len(calls) > 1
    assert all(len(call) == 1 or sum(call) <= limit for call in calls)
    with vitcore.open_tokens(tmp_path / "whole.h5") as whole, vitcore.open_tokens(tmp_path / "split.h5") as split:
        assert whole.keys == split.keys
        for key in whole.keys:
            ref = _reference_for(visual, folder_of_images / key)
            assert _rel(torch.from_numpy(split[key]), ref.pooler_output) < 1e-4
            np.testing.assert_allclose(split[key], whole[key], rtol=1e-5, atol=1e-6)


def test_pack_groups_rules():
    from vitcore.encoders.qwen.family import pack_groups

    item = lambda n: (torch.zeros(n, 1), (1, n, 1))  # noqa: E731
    sizes = lambda groups: [[x[0].shape[0] for x in g] for g in groups]  # noqa: E731
    assert sizes(pack_groups([item(n) for n in (3, 4, 9, 2, 2, 5)], 8)) == [[3, 4], [9], [2, 2], [5]]
    assert sizes(pack_groups([item(n) for n in (3, 4, 9)], None)) == [[3, 4, 9]]
    assert sizes(pack_groups([item(20)], 8)) == [[20]]


def test_processor_choice_is_recorded_checked_on_resume_and_followed_by_similar(checkpoint, folder_of_images, tmp_path):
    """--processor picks transformers' backend; the file records it, --resume refuses the other one
    (naming the option), and a new image given to `similar` is encoded with the file's backend."""
    import shutil

    import h5py

    import vitcore
    from vitcore.consumers.search import encode_like
    from vitcore.errors import ResumeMismatchError, UsageError

    folder, _ = checkpoint
    opts = dict(weights=str(folder), dtype="float32", out_dtype="float32", workers=0, batch_size=4)
    files = {backend: tmp_path / f"{backend}.h5" for backend in BACKENDS}
    vitcore.extract(folder_of_images, files["torchvision"], **opts)  # the default
    vitcore.extract(folder_of_images, files["pil"], processor="pil", **opts)
    means, errors = {}, {}
    for backend, path in files.items():
        with vitcore.open_tokens(path) as f:
            record = f.settings["preprocessing"]
            assert record["backend"] == backend and record["interpolation"] == \
                f"bicubic ({'Pillow' if backend == 'pil' else 'torchvision'})"
            assert f"processor {backend}" in f.describe()["summary"]["preprocessing"]
            means[backend] = f.mean("tall.png")
            errors[backend] = np.abs(encode_like(f, str(folder_of_images / "tall.png")) - means[backend]).max()
    gap = np.abs(means["pil"] - means["torchvision"]).max()
    assert max(errors.values()) * 10 < gap  # each file's query is its own backend's, not the other's

    with pytest.raises(ResumeMismatchError, match=r"backend: file pil \(--processor pil\), this run torchvision"):
        vitcore.extract(folder_of_images, files["pil"], resume=True, **opts)
    vitcore.extract(folder_of_images, files["pil"], resume=True, processor="pil", **opts)

    # A file made before the choice existed followed the Pillow backend; it still resumes and searches as such.
    old = tmp_path / "old.h5"
    shutil.copy(files["pil"], old)
    with h5py.File(old, "r+") as h5:
        record = json.loads(h5.attrs["preprocessing"])
        del record["backend"]
        h5.attrs["preprocessing"] = json.dumps(record, sort_keys=True)
    vitcore.extract(folder_of_images, old, resume=True, processor="pil", **opts)
    with pytest.raises(ResumeMismatchError, match="backend"):
        vitcore.extract(folder_of_images, old, resume=True, **opts)
    with vitcore.open_tokens(old) as f:
        assert np.abs(encode_like(f, str(folder_of_images / "tall.png")) - means["pil"]).max() * 10 < gap

    # Box and hamming filters exist only in the Pillow backend; the seed encoders take no --processor.
    boxed = tmp_path / "boxed"
    shutil.copytree(folder, boxed)
    config = json.loads((boxed / "preprocessor_config.json").read_text())
    (boxed / "preprocessor_config.json").write_text(json.dumps({**config, "resample": 4}))
    with pytest.raises(UsageError, match="resamples with box, which transformers' torchvision backend cannot do"):
        vitcore.extract(folder_of_images, tmp_path / "box.h5", **{**opts, "weights": str(boxed)})
    vitcore.extract(folder_of_images, tmp_path / "box.h5", processor="pil", **{**opts, "weights": str(boxed)})
    with pytest.raises(UsageError, match="--processor pil is for the families preprocessed by transformers"):
        vitcore.extract(folder_of_images, tmp_path / "seed.h5", model="small", processor="pil")
    with pytest.raises(UsageError, match="--processor"):
        vitcore.extract(folder_of_images, tmp_path / "x.h5", processor="fast", **opts)
