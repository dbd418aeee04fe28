"""What every encoder family must do, parametrized over the registry. A new family gets these tests
by adding its run to RUNS (test_every_registered_family_is_tested fails until it does)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import vitcore
from tests.helpers import HF_CHECKPOINTS, SAMPLES, TINY, save_tiny_qwen2vl, save_tiny_qwen3vl
from vitcore.encoders import registry as families
from vitcore.errors import VitExtractError


def _photos(folder, sizes):
    folder.mkdir()
    for name in ("astronaut.jpg", "chelsea.jpg"):
        shutil.copy(SAMPLES / name, folder / name)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"noise{i}.png")
    return folder


def seed_run(tmp_path_factory):
    import vitcore.encoders.seed.model

    options = dict(model=TINY)
    return options, vitcore.encoders.seed.model.VisionEncoder, "forward_features"


def qwen3vl_run(tmp_path_factory):
    import vitcore.encoders.qwen.qwen3vl

    folder = tmp_path_factory.mktemp("qwen3vl") / "ckpt"
    save_tiny_qwen3vl(folder)
    return dict(weights=str(folder)), vitcore.encoders.qwen.qwen3vl.Qwen3VLVisionEncoder, "forward"


def qwen2vl_run(version):
    def run(tmp_path_factory):
        import vitcore.encoders.qwen.qwen2vl

        folder = tmp_path_factory.mktemp(f"qwen{version}vl") / "ckpt"
        save_tiny_qwen2vl(folder, version)
        tower = vitcore.encoders.qwen.qwen2vl.Qwen2VLVisionEncoder if version == "2" else vitcore.encoders.qwen.qwen2vl.Qwen25VLVisionEncoder
        return dict(weights=str(folder)), tower, "forward"

    return run


def transformers_run(checkpoint: str, tower: str):
    def run(tmp_path_factory):
        import transformers

        saver = HF_CHECKPOINTS[checkpoint][0]
        folder = saver(tmp_path_factory.mktemp(checkpoint) / "ckpt")
        return dict(weights=str(folder)), getattr(transformers, tower), "forward"

    return run


def timm_run(tmp_path_factory):
    timm = pytest.importorskip("timm", reason="timm (and the torchvision it needs) is not installed")
    from safetensors.torch import save_file

    name = "vit_tiny_patch16_224"
    path = tmp_path_factory.mktemp("timm") / f"{name}.safetensors"
    save_file(timm.create_model(name, pretrained=False).state_dict(), str(path))
    return dict(model=f"timm:{name}", weights=str(path)), type(timm.create_model(name)), "forward_features"


# family → a function giving (options, the module class whose forward a fake device error replaces, its name)
RUNS = {"seed": seed_run, "qwen3-vl": qwen3vl_run, "qwen2.5-vl": qwen2vl_run("2.5"), "qwen2-vl": qwen2vl_run("2"),
        "siglip": transformers_run("siglip", "SiglipVisionModel"),
        "siglip2": transformers_run("siglip2", "Siglip2VisionModel"),
        "clip": transformers_run("clip", "CLIPVisionModelWithProjection"),
        "dinov2": transformers_run("dinov2_with_registers", "Dinov2WithRegistersModel"), "timm": timm_run}


def _images(name: str, args, kwargs) -> int:
    """How many images a forward pass was given: the packed families pass each image's grid."""
    if name.startswith("qwen"):
        return len(args[1])  # (patches, grids)
    return (args[0] if args else kwargs["pixel_values"]).shape[0]


def _inflated(name: str, out, factor: float):
    """A forward's output with its tokens multiplied (each family's forward returns its own kind)."""
    if name == "seed":
        return out[0] * factor, out[1]
    if name.startswith("qwen"):
        out.tokens = out.tokens * factor
        return out
    if isinstance(out, torch.Tensor):  # timm's forward_features
        return out * factor
    out.last_hidden_state = out.last_hidden_state * factor  # transformers' model output
    return out


def test_every_registered_family_is_tested():
    assert set(RUNS) == set(families.BY_NAME)


@pytest.fixture(scope="module", params=list(families.BY_NAME))
def family_run(request, tmp_path_factory):
    options, module, forward = RUNS[request.param](tmp_path_factory)
    folder = _photos(tmp_path_factory.mktemp("photos") / "imgs", [(40, 90), (130, 60)])
    options.update(dtype="float32", out_dtype="float32", device="cpu", workers=0, batch_size=4)
    return request.param, options, module, forward, folder


def test_the_family_answers_its_interface_and_is_found_by_its_options(family_run):
    name, options, *_ = family_run
    family = families.get(name)
    assert family.name == name and family.summary and isinstance(family.compilable, bool)
    for method in ("claims", "check", "record", "build", "rebuild", "describe", "token_grid", "prefix_tokens",
                   "deepstack_levels", "framed"):
        assert callable(getattr(family, method))
    assert families.for_run(options.get("model"), options.get("weights")) is family
    assert families.for_run(name, options.get("weights")) is family


def test_out_of_memory_splits_the_batch_for_every_family(family_run, tmp_path, monkeypatch):
    name, options, module, forward, folder = family_run
    from vitcore.encoders.qwen import family as qwenvl

    monkeypatch.setattr(qwenvl, "CPU_PACK_PATCHES", 10**9)  # a batch is one sequence here, as on a GPU
    reference = tmp_path / "reference.h5"
    vitcore.extract([folder], reference, **options)
    real = getattr(module, forward)
    passes = []

    def small_memory(self, *args, **kwargs):
        if (args[0] if args else kwargs["pixel_values"]).is_meta:  # a record's shape probe: no memory used
            return real(self, *args, **kwargs)
        images = _images(name, args, kwargs)
        passes.append(images)
        if images > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (a fake device error)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(module, forward, small_memory)
    out = tmp_path / "out.h5"
    result = vitcore.extract([folder], out, **options)
    assert result.complete and result.rows == 4 and passes[:3] == [4, 2, 1]  # halved, then halved again
    assert set(passes[3:]) == {1}  # one image a pass from then on
    assert any("continuing with 2 per pass" in w for w in result.warnings)
    assert any("--batch-size 1" in w for w in result.warnings)
    with vitcore.open_tokens(out) as f, vitcore.open_tokens(reference) as g:
        assert f.keys == g.keys
        for key in f.keys:
            np.testing.assert_allclose(f[key], g[key], rtol=1e-5, atol=1e-5)

    def no_memory(self, *args, **kwargs):
        if (args[0] if args else kwargs["pixel_values"]).is_meta:
            return real(self, *args, **kwargs)
        raise torch.OutOfMemoryError("CUDA out of memory (a fake device error)")

    monkeypatch.setattr(module, forward, no_memory)
    with pytest.raises(VitExtractError, match="out of cpu memory for a single image"):
        vitcore.extract([folder], tmp_path / "none.h5", **options)


def test_non_finite_tokens_are_counted_for_every_family(family_run, tmp_path, monkeypatch):
    name, options, module, forward, folder = family_run
    real = getattr(module, forward)

    def overflowing(self, *args, **kwargs):  # values far past float16's 65504 on every image
        return _inflated(name, real(self, *args, **kwargs), 1e9)

    monkeypatch.setattr(module, forward, overflowing)
    result = vitcore.extract([folder], tmp_path / "half.h5", **{**options, "out_dtype": "float16"})
    assert f"{result.rows} images have token values that are not finite" in " ".join(result.warnings)


def test_a_new_image_is_encoded_as_the_file_was(family_run, tmp_path):
    name, options, _, _, folder = family_run
    out = tmp_path / "out.h5"
    vitcore.extract([folder], out, **options)
    from vitcore.consumers.search import similar

    hits, kind = similar(str(out), str(folder / "chelsea.jpg"), k=1)
    assert kind == "image" and hits[0].key == "chelsea.jpg" and hits[0].score > 0.9999
    with vitcore.open_tokens(out) as f:
        summary = f.describe()["summary"]
        assert summary["encoder"] and summary["preprocessing"]
        rows, cols = f.token_grid("chelsea.jpg")
        assert rows * cols + f.prefix_tokens() == len(f["chelsea.jpg"]) and len(f.patch_tokens("chelsea.jpg")) == rows * cols


def test_what_the_record_says_is_what_the_build_does(family_run):
    """A resume that finds nothing left to do trusts the record alone: it must be what a build records."""
    name, options, *_ = family_run
    family = families.get(name)
    from vitcore.options import ExtractOptions

    encoder_opts = ExtractOptions(**{k: v for k, v in options.items()}).parts()[0]
    record = family.record(encoder_opts, torch.device("cpu"))
    built = family.build(encoder_opts, torch.device("cpu"), torch.float32)
    for field in ("name", "encoder_record", "preprocessing", "weights", "outputs", "projector", "grid_thw"):
        assert getattr(built, field) == getattr(record, field), field
    assert built.weights.sha256 or built.weights.untrained


def test_a_resume_with_nothing_left_builds_nothing_for_every_family(family_run, tmp_path, monkeypatch):
    name, options, _, _, folder = family_run
    out = tmp_path / "out.h5"
    first = vitcore.extract([folder], out, **options)
    family = families.get(name)

    def no_build(*args, **kwargs):
        raise AssertionError("the encoder was built for a resume with nothing to do")

    import h5py

    with h5py.File(out, "a") as h5:  # as a run killed after its last commit leaves it
        h5.attrs["complete"] = False
    monkeypatch.setattr(type(family), "build", no_build)
    again = vitcore.extract([folder], out, resume=True, **options)
    assert (again.written, again.skipped, again.rows, again.complete) == (0, 4, first.rows, True)
    with h5py.File(out, "r") as h5:
        assert bool(h5.attrs["complete"])
    assert again.encoder == first.encoder and again.weights == first.weights
    with pytest.raises(VitExtractError, match="cannot resume .* differs"):  # still compared, still unbuilt
        vitcore.extract([folder], out, resume=True, **{**options, "pool": "mean"})
