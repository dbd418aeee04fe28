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
from tests.helpers import BACKENDS, HF_CHECKPOINTS as CHECKPOINTS, processor_class

SIZES = [(90, 60), (47, 120), (200, 200), (33, 250), (64, 64)]  # (width, height): wide, tall, square, thin, exact


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
        assert json.loads(f.h5.attrs["preprocessing"])["resize_rule"] == "max_patches"
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


def test_resume_shards_tar_and_token_dataset_over_a_clip_checkpoint(checkpoints, pictures, tmp_path, cli):
    """The rest of the tool over one of these families: tokens from a tar equal those from the folder,
    a resumed run and merged shards equal one uninterrupted run, TokenDataset gives the same rows, and
    a resume with another prefix choice is refused naming it."""
    import tarfile

    from vitcore.store.merge import merge

    folder = str(checkpoints["clip"])
    common = dict(weights=folder, dtype="float32", out_dtype="float32", workers=0, layers=(-2,), drop_prefix=True)
    whole = tmp_path / "whole.h5"
    vitcore.extract([str(pictures)], str(whole), **common)
    names = sorted(p.name for p in pictures.glob("*.png"))

    shard_tar = tmp_path / "pictures.tar"
    with tarfile.open(shard_tar, "w") as tar:
        for name in names:
            tar.add(pictures / name, arcname=name)
    vitcore.extract([str(shard_tar)], str(tmp_path / "tar.h5"), **common)

    listed = tmp_path / "first.txt"
    listed.write_text("".join(f"{pictures / n}\n" for n in names[:2]))
    resumed = tmp_path / "resumed.h5"
    vitcore.extract([], str(resumed), files_from=str(listed), **common)
    vitcore.extract([str(pictures)], str(resumed), resume=True, **common)

    parts = [str(tmp_path / f"s.shard0000{i}-of-00002.h5") for i in range(2)]
    for i, part in enumerate(parts):
        vitcore.extract([str(pictures)], part, shard=(i, 2), **common)
    merge(str(tmp_path / "merged.h5"), parts)

    with vitcore.open_tokens(whole) as f:
        expected = {f.keys[i]: (f[i], f.read("layers/-2", i)) for i in range(len(f))}
        assert all(t.shape == (16, 32) for t, _ in expected.values())  # 4 × 4 patches, CLS dropped
    for made in ("tar.h5", "resumed.h5", "merged.h5"):
        with vitcore.open_tokens(tmp_path / made) as f:
            keys = [key.rpartition("/")[2] for key in f.keys]  # a tar's members are keyed pictures.tar/NAME
            assert sorted(keys) == names, made
            for i, key in enumerate(keys):
                np.testing.assert_array_equal(f[i], expected[key][0], err_msg=made)
                np.testing.assert_array_equal(f.read("layers/-2", i), expected[key][1], err_msg=made)
    items = vitcore.TokenDataset(str(whole))
    assert [items[i]["key"] for i in range(len(items))] == names
    for i in range(len(items)):
        np.testing.assert_array_equal(items[i]["tokens"].numpy(), expected[names[i]][0])
        np.testing.assert_array_equal(items[i]["features"]["layers/-2"].numpy(), expected[names[i]][1])

    refused = cli("run", str(pictures), "-o", str(resumed), "--weights", folder, "--layer", "-2", "--resume",
                  "--dtype", "float32", "--out-dtype", "float32")
    assert refused.exit_code == 2 and "encoder" in refused.output, refused.output


def test_a_hub_cache_folder_is_read_at_its_current_snapshot(checkpoints, pictures, tmp_path, cli):
    """The hub cache's layout: models--ORG--NAME/snapshots/<rev>/ of symlinks into blobs/, refs/main
    naming the current revision. The repo folder, or the snapshot itself, gives the same tokens."""
    import os
    import shutil

    repo = tmp_path / "hub" / "models--org--tiny-dinov2"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    for rev in ("0ld", "c0ffee"):
        (repo / "snapshots" / rev).mkdir(parents=True)
    for source in checkpoints["dinov2"].iterdir():
        blob = repo / "blobs" / f"blob-{source.name}"
        shutil.copy(source, blob)
        for rev in ("0ld", "c0ffee"):
            os.symlink(os.path.relpath(blob, repo / "snapshots" / rev), repo / "snapshots" / rev / source.name)
    (repo / "refs" / "main").write_text("c0ffee")
    common = ["--workers", "0", "--dtype", "float32", "--out-dtype", "float32"]
    by_repo = cli("run", str(pictures), "-o", str(tmp_path / "repo.h5"), "--weights", str(repo), *common)
    direct = cli("run", str(pictures), "-o", str(tmp_path / "direct.h5"), "--weights", str(checkpoints["dinov2"]), *common)
    assert by_repo.exit_code == 0 and direct.exit_code == 0, by_repo.output + direct.output
    with vitcore.open_tokens(tmp_path / "repo.h5") as f, vitcore.open_tokens(tmp_path / "direct.h5") as g:
        assert f.settings["weights"]["path"] == str(repo / "snapshots" / "c0ffee")
        assert f.settings["weights"]["sha256"] == g.settings["weights"]["sha256"]
        for i in range(len(g)):
            np.testing.assert_array_equal(f[i], g[i])
    (repo / "refs" / "main").unlink()
    refused = cli("run", str(pictures), "-o", str(tmp_path / "x.h5"), "--weights", str(repo))
    assert refused.exit_code == 2 and "2 snapshots and no refs/main" in refused.output


def test_what_users_hand_it_is_read_or_refused_in_one_line(checkpoints, pictures, tmp_path, cli):
    """Cases from the field: a bare CLIP tower saved as pytorch_model.bin; a config.json transformers'
    validation rejects; a hub snapshot whose weights link to a missing blob; a resume with another
    family, or a tower config that differs in one nested key; pooled files asked for patch tokens."""
    import os
    import shutil

    import transformers as t

    bare = tmp_path / "bare"  # the older format: weights in pytorch_model.bin (architectures says the class)
    tower = t.CLIPVisionModel(t.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, image_size=56, patch_size=14))
    tower.save_pretrained(bare)
    torch.save(tower.state_dict(), bare / "pytorch_model.bin")
    (bare / "model.safetensors").unlink()
    t.CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(bare)
    assert (bare / "pytorch_model.bin").exists() and not (bare / "model.safetensors").exists()
    run = cli("run", str(pictures), "-o", str(tmp_path / "bare.h5"), "--weights", str(bare), "--workers", "0")
    assert run.exit_code == 0, run.output
    with vitcore.open_tokens(tmp_path / "bare.h5") as f:
        assert f.settings["encoder"]["class"] == "CLIPVisionModel"

    invalid = tmp_path / "invalid"
    shutil.copytree(checkpoints["clip"], invalid)
    config = json.loads((invalid / "config.json").read_text())
    config["vision_config"]["image_size"] = 56.5
    (invalid / "config.json").write_text(json.dumps(config))
    broken = tmp_path / "snapshot"
    broken.mkdir()
    for source in checkpoints["clip"].iterdir():
        (broken / source.name).symlink_to(tmp_path / "blobs" / source.name if source.suffix == ".safetensors" else source)
    for folder, words in ((invalid, "config.json cannot be read by transformers"), (broken, "an incomplete download?")):
        result = cli("run", str(pictures), "-o", str(tmp_path / "x.h5"), "--weights", str(folder), "--workers", "0")
        assert result.exit_code != 0 and words in result.output and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output

    made = tmp_path / "made.h5"
    assert cli("run", str(pictures), "-o", str(made), "--weights", str(checkpoints["siglip"]), "--workers", "0").exit_code == 0
    other = cli("run", str(pictures), "-o", str(made), "--resume")
    assert other.exit_code == 2 and "made by the siglip encoder family, this run uses seed" in other.output
    wider = tmp_path / "wider"
    shutil.copytree(checkpoints["siglip"], wider)
    config = json.loads((wider / "config.json").read_text())
    config["vision_config"]["layer_norm_eps"] = 1e-3
    (wider / "config.json").write_text(json.dumps(config))
    nested = cli("run", str(pictures), "-o", str(made), "--resume", "--weights", str(wider))
    assert nested.exit_code == 2 and "config.layer_norm_eps: file 1e-06, this run 0.001" in nested.output, nested.output

    headless = tmp_path / "headless"
    shutil.copytree(checkpoints["siglip"], headless)
    config = json.loads((headless / "config.json").read_text())
    config["vision_config"]["vision_use_head"] = False
    (headless / "config.json").write_text(json.dumps(config))
    result = cli("run", str(pictures), "-o", str(tmp_path / "x.h5"), "--weights", str(headless), "--pool", "model")
    assert result.exit_code == 2 and "(its vision config has vision_use_head false" in result.output, result.output

    pooled = tmp_path / "pooled.h5"
    assert cli("run", str(pictures), "-o", str(pooled), "--weights", str(checkpoints["dinov2_with_registers"]),
               "--pool", "model", "--workers", "0").exit_code == 0
    with vitcore.open_tokens(pooled) as f:
        for ask in (f.patch_tokens, f.token_grid):
            with pytest.raises(vitcore.VitExtractError, match="holds pooled vectors"):
                ask(0)
        with pytest.raises(vitcore.VitExtractError, match="holds no layers/5; it holds tokens"):
            f.read("layers/5", 0)
    os.remove(pooled)


def test_without_the_library_a_run_names_the_extra_to_install(checkpoints, pictures, tmp_path, monkeypatch, cli):
    """The Quick start installs no transformers and no timm: these families say what to install."""
    import importlib.util
    import sys

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    result = cli("run", str(pictures), "-o", str(tmp_path / "x.h5"), "--weights", str(checkpoints["clip"]))
    assert result.exit_code == 2 and "pip install 'vit-extract[transformers]'" in result.output, result.output
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    result = cli("run", str(pictures), "-o", str(tmp_path / "x.h5"), "--model", "timm:vit_tiny_patch16_224",
                 "--weights", str(weights))
    assert result.exit_code == 2 and "pip install 'vit-extract[timm]'" in result.output, result.output
    assert not (tmp_path / "x.h5").exists()
