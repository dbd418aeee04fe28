"""--model timm:NAME --weights FILE against timm itself: random weights saved to a local file, and the
loop a timm user writes (create_model from that file, the model's own data config and eval
transform, forward_features / forward_intermediates / forward_head) as the reference, in float32.
timm needs torchvision: without it these are skipped, and .ci/run's second pass, which installs
both, runs them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vitcore

timm = pytest.importorskip("timm", reason="timm (and the torchvision it needs) is not installed")

# plain ViT (CLS token), DINOv2 with registers (1 + 4 prefix tokens), EVA-02 (RoPE, average pool),
# SigLIP (no prefix token, attention-pool head)
MODELS = {"vit_tiny_patch16_224": 1, "vit_small_patch14_reg4_dinov2": 5, "eva02_tiny_patch14_224": 1,
          "vit_base_patch16_siglip_224": 0}
SIZES = [(300, 200), (150, 260), (224, 224)]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(3)
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def _weights(folder, name: str):
    """timm's model of ``name`` with random weights (every parameter nudged), saved as .safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.02)
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _timm_loop(name: str, weights, paths, layer: int):
    """What a timm user gets: (tokens, hidden states after block ``layer``, pooled) per picture."""
    model = timm.create_model(name, pretrained=True, num_classes=0,
                              pretrained_cfg_overlay={"file": str(weights), "custom_load": False}).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    out = []
    with torch.no_grad():
        for path in paths:
            with Image.open(path) as img:
                x = transform(img.convert("RGB"))[None]
            features = model.forward_features(x)
            hidden = model.forward_intermediates(x, indices=[layer], norm=False, output_fmt="NLC",
                                                 intermediates_only=True, return_prefix_tokens=MODELS[name] > 0)[0]
            if MODELS[name]:
                hidden = torch.cat([hidden[1], hidden[0]], dim=1)
            out.append((features[0].numpy(), hidden[0].numpy(), model.forward_head(features, pre_logits=True)[0].numpy()))
    return out


def _close(ours, theirs, what):
    err = np.abs(np.asarray(ours, np.float64) - theirs).max() / max(np.abs(theirs).max(), 1e-6)
    assert err < 1e-5, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("name", list(MODELS))
def test_tokens_layers_and_pooled_equal_timm(tmp_path, pictures, name):
    weights = _weights(tmp_path, name)
    paths = sorted(pictures.glob("*.png"))
    expected = _timm_loop(name, weights, paths, layer=-2)
    common = dict(model=f"timm:{name}", weights=str(weights), dtype="float32", out_dtype="float32", workers=0)
    vitcore.extract([str(pictures)], str(tmp_path / "t.h5"), layers=(-2,), **common)
    vitcore.extract([str(pictures)], str(tmp_path / "p.h5"), pool="model", **common)
    vitcore.extract([str(pictures)], str(tmp_path / "d.h5"), drop_prefix=True, **common)
    with vitcore.open_tokens(tmp_path / "t.h5") as f, vitcore.open_tokens(tmp_path / "p.h5") as p, \
            vitcore.open_tokens(tmp_path / "d.h5") as d:
        assert f.settings["encoder"]["prefix_tokens"] == MODELS[name]
        assert d.settings["encoder"]["prefix_tokens"] == 0
        assert d.settings["encoder"]["prefix_tokens_dropped"] == MODELS[name]
        for i, (tokens, hidden, pooled) in enumerate(expected):
            _close(f[i], tokens, f"{name} tokens")
            _close(f.read("layers/-2", i), hidden, f"{name} layers/-2")
            _close(p[i], pooled, f"{name} pooled")
            np.testing.assert_array_equal(d[i], f[i][MODELS[name]:])
            rows, cols = f.token_grid(i)
            assert rows * cols + MODELS[name] == len(f[i])


def test_timm_refusals(tmp_path, pictures, cli):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    for args, words in ((["--model", "timm:no_such_model_xyz", "--weights", str(weights)], "timm has no model"),
                        (["--model", "timm:vit_tiny_patch16_224"], "needs --weights FILE"),
                        (["--model", "timm:vit_tiny_patch16_224", "--weights", str(weights), "--processor", "pil"],
                         "--processor is for the transformers-processed families")):
        result = cli("run", str(pictures), "-o", str(tmp_path / "x.h5"), *args)
        assert result.exit_code == 2 and words in result.output, (args, result.output)
    result = cli("run", str(pictures), "-o", str(tmp_path / "x.h5"), "--model", "timm:vit_tiny_patch16_224",
                 "--weights", str(weights))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert not (tmp_path / "x.h5").exists()


def test_a_file_of_another_model_or_missing_tensors_is_refused(tmp_path, pictures, cli):
    """timm loads loosely once the classifier is dropped (missing tensors stay random, only logged):
    vit-extract refuses, naming them, and writes nothing."""
    from safetensors.torch import load_file, save_file

    whole = _weights(tmp_path, "vit_tiny_patch16_224")
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in load_file(str(whole)).items() if not k.startswith("blocks.11.")}, str(partial))
    other = _weights(tmp_path, "eva02_tiny_patch14_224")
    for weights, words in ((partial, "missing ['blocks.11."), (other, "into vit_tiny_patch16_224: size mismatch")):
        result = cli("run", str(pictures), "-o", str(tmp_path / "x.h5"), "--model", "timm:vit_tiny_patch16_224",
                     "--weights", str(weights), "--workers", "0")
        assert result.exit_code == 1 and words in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x.h5").exists()
