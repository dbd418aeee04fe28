"""The towers transformers defines (SigLIP, SigLIP2 NaFlex, CLIP, DINOv2 with and without registers),
each against the library itself: tiny random checkpoints saved with transformers' own config
classes and save_pretrained, and for each one our stored tokens, hidden states and pooled embedding
against transformers' image processor (both backends) + the model, on pictures of several sizes
and aspect ratios, in float32."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vitcore
from tests.helpers import BACKENDS, processor_class

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
SIZES = [(90, 60), (47, 120), (200, 200), (33, 250), (64, 64)]  # (width, height): wide, tall, square, thin, exact


def _visible(model, seed: int):
    """Biases and norms made visible (random init leaves many at 0 or 1), so each parameter matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    return model.eval()


def _save(folder, model, processor):
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# name → (family, the library's model for the folder, its processor class name, builder(folder, backend class))
def _clip(folder):
    import transformers as t

    config = t.CLIPConfig(text_config=TEXT, vision_config=dict(VISION, image_size=56, patch_size=14), projection_dim=24)
    return _save(folder, _visible(t.CLIPModel(config), 1),
                 t.CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}))


def _clip_vision(folder):
    """A bare CLIPVisionModel (no projection): pooled is the normalised CLS."""
    import transformers as t

    config = t.CLIPVisionConfig(**VISION, image_size=42, patch_size=14)
    return _save(folder, _visible(t.CLIPVisionModel(config), 2), t.CLIPImageProcessorPil(
        size={"shortest_edge": 48}, crop_size={"height": 42, "width": 42}, resample=2))


def _siglip(folder):
    import transformers as t

    config = t.SiglipConfig(text_config=TEXT, vision_config=dict(VISION, image_size=64, patch_size=16))
    return _save(folder, _visible(t.SiglipModel(config), 3), t.SiglipImageProcessorPil(size={"height": 64, "width": 64}))


def _siglip2(folder):
    import transformers as t

    config = t.Siglip2Config(text_config=TEXT, vision_config=dict(VISION, num_patches=16, patch_size=16))
    return _save(folder, _visible(t.Siglip2Model(config), 4), t.Siglip2ImageProcessorPil(patch_size=16, max_num_patches=24))


def _dinov2(folder):
    import transformers as t

    config = t.Dinov2Config(**VISION, image_size=56, patch_size=14)
    return _save(folder, _visible(t.Dinov2Model(config), 5), t.BitImageProcessorPil(
        size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]))


def _dinov2_registers(folder):
    import transformers as t

    config = t.Dinov2WithRegistersConfig(**VISION, image_size=56, patch_size=14, num_register_tokens=3)
    return _save(folder, _visible(t.Dinov2WithRegistersModel(config), 6), t.BitImageProcessorPil(
        size={"shortest_edge": 70}, crop_size={"height": 42, "width": 56}))


CHECKPOINTS = {  # name → (saver, family, processor class, prefix tokens)
    "clip": (_clip, "clip", "CLIPImageProcessor", 1),
    "clip_vision_model": (_clip_vision, "clip", "CLIPImageProcessor", 1),
    "siglip": (_siglip, "siglip", "SiglipImageProcessor", 0),
    "siglip2": (_siglip2, "siglip2", "Siglip2ImageProcessor", 0),
    "dinov2": (_dinov2, "dinov2", "BitImageProcessor", 1),
    "dinov2_with_registers": (_dinov2_registers, "dinov2", "BitImageProcessor", 4),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: saver(root / name) for name, (saver, *_) in CHECKPOINTS.items()}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(7)
    for i, (w, h) in enumerate(SIZES):
        # smooth gradients plus noise: every resize filter leaves its mark
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(w + h - 2, 1)], -1)
        noisy = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"p{i}.png")
    return folder


def _library(folder, name: str, backend: str, picture_paths, layers=()):
    """What transformers gives for these pictures: (tokens per picture, {K: hidden states}, pooled)."""
    import transformers as t

    _, family, processor_name, _ = CHECKPOINTS[name]
    processor = processor_class(backend, processor_name).from_pretrained(str(folder))
    model = {"clip": t.CLIPModel, "clip_vision_model": t.CLIPVisionModel, "siglip": t.SiglipModel,
             "siglip2": t.Siglip2Model, "dinov2": t.Dinov2Model,
             "dinov2_with_registers": t.Dinov2WithRegistersModel}[name].from_pretrained(str(folder)).eval()
    tokens, hidden, pooled = [], {k: [] for k in layers}, []
    for path in picture_paths:
        with Image.open(path) as img:
            inputs = processor(images=img.convert("RGB"), return_tensors="pt")
        with torch.no_grad():
            if name in ("clip", "siglip", "siglip2"):
                vision = model.vision_model(**inputs, output_hidden_states=True)
                embedding = model.get_image_features(**inputs).pooler_output
            else:
                vision = model(**inputs, output_hidden_states=True)
                embedding = vision.pooler_output
        n = int(inputs["pixel_attention_mask"].sum()) if name == "siglip2" else vision.last_hidden_state.shape[1]
        tokens.append(vision.last_hidden_state[0, :n].numpy())
        for k in layers:
            hidden[k].append(vision.hidden_states[k + 1 if k >= 0 else k][0, :n].numpy())
        pooled.append(embedding[0].numpy())
    return tokens, hidden, pooled


def _close(ours, theirs, what):
    scale = max(np.abs(theirs).max(), 1e-6)
    err = np.abs(np.asarray(ours, np.float64) - theirs).max() / scale
    assert err < 1e-5, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_tokens_hidden_states_and_pooled_equal_the_library(checkpoints, pictures, tmp_path, name, backend):
    folder = checkpoints[name]
    paths = sorted(pictures.glob("*.png"))
    expected_tokens, expected_hidden, expected_pooled = _library(folder, name, backend, paths, layers=(-2, 0))
    common = dict(weights=str(folder), dtype="float32", out_dtype="float32", processor=backend, workers=0)
    vitcore.extract([str(pictures)], str(tmp_path / "t.h5"), layers=(-2, 0), **common)
    vitcore.extract([str(pictures)], str(tmp_path / "p.h5"), pool="model", **common)
    with vitcore.open_tokens(tmp_path / "t.h5") as f, vitcore.open_tokens(tmp_path / "p.h5") as p:
        assert f.keys == [q.name for q in paths]
        encoder = f.settings["encoder"]
        assert encoder["family"] == CHECKPOINTS[name][1] and encoder["prefix_tokens"] == CHECKPOINTS[name][3]
        for i, path in enumerate(paths):
            _close(f[i], expected_tokens[i], f"{path.name} tokens")
            for k in (-2, 0):
                _close(f.read(f"layers/{k}", i), expected_hidden[k][i], f"{path.name} layers/{k}")
            _close(p[i], expected_pooled[i], f"{path.name} pooled")
            rows, cols = f.token_grid(i)
            assert rows * cols + encoder["prefix_tokens"] == len(f[i])


def test_drop_prefix_removes_exactly_the_prefix_tokens(checkpoints, pictures, tmp_path):
    folder = checkpoints["dinov2_with_registers"]
    common = dict(weights=str(folder), dtype="float32", out_dtype="float32", workers=0, layers=(-2,))
    vitcore.extract([str(pictures)], str(tmp_path / "all.h5"), **common)
    vitcore.extract([str(pictures)], str(tmp_path / "patch.h5"), drop_prefix=True, **common)
    with vitcore.open_tokens(tmp_path / "all.h5") as whole, vitcore.open_tokens(tmp_path / "patch.h5") as patch:
        assert whole.settings["encoder"]["prefix_tokens"] == 4
        assert patch.settings["encoder"]["prefix_tokens"] == 0
        assert patch.settings["encoder"]["prefix_tokens_dropped"] == 4
        for i in range(len(whole)):
            assert whole[i].shape == (4 + 12, 32) and patch[i].shape == (12, 32)  # 42 × 56 crop: 3 × 4 patches
            np.testing.assert_array_equal(patch[i], whole[i][4:])
            np.testing.assert_array_equal(patch.read("layers/-2", i), whole.read("layers/-2", i)[4:])


def test_only_the_vision_tower_is_loaded(checkpoints):
    """A CLIPModel folder: the tower built holds the vision weights and the projection, no text tower."""
    import transformers as t

    from vitcore.encoders import registry
    from vitcore.options import EncoderOptions

    folder = str(checkpoints["clip"])
    family = registry.for_run(None, folder)
    built = family.build(EncoderOptions(weights=folder), torch.device("cpu"), torch.float32)
    full = t.CLIPModel.from_pretrained(folder)
    vision = sum(p.numel() for p in full.vision_model.parameters()) + full.visual_projection.weight.numel()
    loaded = built.encode.__closure__  # the encoder's model is held by encode(); find it among the cells
    models = [c.cell_contents for c in loaded if isinstance(c.cell_contents, torch.nn.Module)]
    assert len(models) == 1 and type(models[0]).__name__ == "CLIPVisionModelWithProjection"
    assert sum(p.numel() for p in models[0].parameters()) == vision
    assert not any("text" in n for n, _ in models[0].named_parameters())


def test_records_refusals_and_info(checkpoints, pictures, tmp_path, cli):
    folder = checkpoints["siglip2"]
    out = tmp_path / "n.h5"
    result = cli("run", str(pictures), "-o", str(out), "--weights", str(folder), "--workers", "0")
    assert result.exit_code == 0, result.output
    with vitcore.open_tokens(out) as f:
        grids = [tuple(f.h5["grid_thw"][i]) for i in range(len(f))]
        assert all(t == 1 and h * w <= 24 for t, h, w in grids)  # NaFlex: at most max_num_patches each
        assert len({(h, w) for _, h, w in grids}) > 1  # aspect ratios kept
        assert json.loads(f.h5.attrs["preprocessing"])["resize"] == "max_patches"
    info = cli("info", str(out))
    assert "SigLIP2 Siglip2VisionModel" in info.output and "NaFlex" in info.output
    # what each family refuses, in one line
    for args, words in (
        (["--resolution", "224"], "--resolution is for the Qwen-VL families"),
        (["--project-dim", "8"], "--project-dim is for the seed encoders"),
        (["--decode", "gpu"], "--decode gpu works with the seed encoders"),
        (["--layer", "3"], "--layer 3 is out of range: this encoder has 3 blocks"),
        (["--pool", "model", "--layer", "-2"], "--pool model stores one embedding per image"),
    ):
        result = cli("run", str(pictures), "-o", str(tmp_path / "x.h5"), "--weights", str(folder), *args)
        assert result.exit_code == 2 and words in result.output, (args, result.output)
        assert not (tmp_path / "x.h5").exists()
    result = cli("run", str(pictures), "-o", str(tmp_path / "x.h5"), "--model", "small", "--drop-prefix")
    assert result.exit_code == 2 and "--drop-prefix is for towers with prefix tokens" in result.output


def test_an_unknown_model_type_is_refused_naming_the_supported_ones(tmp_path, pictures, cli):
    folder = tmp_path / "vit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    result = cli("run", str(pictures), "-o", str(tmp_path / "x.h5"), "--weights", str(folder))
    assert result.exit_code == 2
    assert "model_type 'vit' is none of" in result.output
    for supported in ("siglip", "siglip2", "clip", "dinov2", "dinov2_with_registers", "qwen3_vl"):
        assert supported in result.output
