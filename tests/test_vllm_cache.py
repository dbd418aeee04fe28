"""vLLM's encoder cache from a token file: one safetensors file per row holding what
vllm_image_embeds / vllm_video_embeds give for it (DeepStack columns in order for Qwen3-VL), rows
= t·h·w ÷ merge²; a uuid stable across runs that changes with the input's bytes, the settings, the
weights and the dtype; reruns keep complete files and never leave half a file under its final
name; what vLLM cannot take is refused. (The round trip through vLLM itself: bench/vllm_check.py.)"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vitcore
from tests.helpers import SAMPLES, make_clip, save_tiny_qwen2vl, save_tiny_qwen3vl
from vitcore.consumers.vllm_cache import CACHE_FILE, read_manifest, vllm_requests, write_vllm_cache
from vitcore.errors import UsageError

EXACT = dict(dtype="float32", out_dtype="float32", workers=0)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """family → (its checkpoint, a file of two pictures and a clip, the inputs' folder)."""
    pytest.importorskip("av")
    root = tmp_path_factory.mktemp("cache")
    inputs = root / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in (("wide.png", (300, 200)), ("tall.png", (180, 420))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(inputs / name)
    make_clip(inputs / "clip.mp4", 12, 90, 64, 10)
    out = {}
    for family, save, features in (("qwen3-vl", save_tiny_qwen3vl, ("deepstack",)),
                                   ("qwen2.5-vl", lambda f: save_tiny_qwen2vl(f, "2.5"), ()),
                                   ("qwen2-vl", lambda f: save_tiny_qwen2vl(f, "2"), ())):
        ckpt = root / family / "ckpt"
        save(ckpt)
        options = dict(fps=2.0) if family != "qwen3-vl" else {}
        h5 = vitcore.extract([inputs], root / family / "t.h5", weights=str(ckpt), features=features,
                             **EXACT, **options).output
        out[family] = (ckpt, h5, inputs)
    return out


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen2.5-vl", "qwen2-vl"])
def test_each_row_is_what_vllm_takes_as_its_embeddings(made, family, tmp_path):
    _, h5, _ = made[family]
    result = write_vllm_cache(h5, tmp_path / "c")
    assert result.written == 3 and result.kept == 0 and result.dtype == "float32"
    manifest = read_manifest(tmp_path / "c")
    assert set(manifest) == {"wide.png", "tall.png", "clip.mp4"}
    for key, entry in manifest.items():
        clip = key.endswith(".mp4")
        embeds = (vitcore.vllm_video_embeds if clip else vitcore.vllm_image_embeds)(h5, [key])
        tensor = load_file(tmp_path / "c" / entry["uuid"] / CACHE_FILE)["ec_cache"]
        assert torch.equal(tensor, embeds["video_embeds" if clip else "image_embeds"])  # DeepStack columns too
        grid = embeds["video_grid_thw" if clip else "image_grid_thw"][0]
        assert tensor.shape[0] == int(grid.prod()) // 4 == entry["tokens"] and entry["grid_thw"] == grid.tolist()
        assert entry["modality"] == ("video" if clip else "image") and entry["family"] == family
    assert "timestamps" in manifest["clip.mp4"] if family == "qwen3-vl" else True
    assert "second_per_grid_ts" in manifest["clip.mp4"] if family == "qwen2.5-vl" else True


def test_requests_carry_grids_timing_and_uuids_but_no_pixels(made, tmp_path):
    _, h5, _ = made["qwen3-vl"]
    write_vllm_cache(h5, tmp_path / "c")
    manifest = read_manifest(tmp_path / "c")
    picture, clip = vllm_requests(tmp_path / "c", [("<p> <p>", ["wide.png", "tall.png"]),
                                                   ({"prompt_token_ids": [1, 2, 3]}, "clip.mp4")])
    assert picture["prompt"] == "<p> <p>"
    assert picture["multi_modal_uuids"] == {"image": [manifest["wide.png"]["uuid"], manifest["tall.png"]["uuid"]]}
    assert picture["multi_modal_data"]["image"]["image_grid_thw"].tolist() == [manifest["wide.png"]["grid_thw"],
                                                                             manifest["tall.png"]["grid_thw"]]
    assert clip["prompt_token_ids"] == [1, 2, 3]
    assert clip["multi_modal_data"]["video"]["timestamps"] == [manifest["clip.mp4"]["timestamps"]]
    with pytest.raises(UsageError, match="all be pictures or all clips"):
        vllm_requests(tmp_path / "c", [("x", ["wide.png", "clip.mp4"])])
    with pytest.raises(UsageError, match="'gone.png' is not in"):
        vllm_requests(tmp_path / "c", [("x", ["gone.png"])])
    shutil.rmtree(tmp_path / "c" / manifest["tall.png"]["uuid"])  # vLLM's engine would die on it
    with pytest.raises(UsageError, match="'tall.png': its cache file .* is missing"):
        vllm_requests(tmp_path / "c", [("x", ["tall.png"])])


def test_the_uuid_is_stable_and_changes_with_bytes_settings_weights_and_dtype(made, tmp_path):
    ckpt, h5, inputs = made["qwen2.5-vl"]

    def uuids(file, dtype=None):
        folder = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        write_vllm_cache(file, folder, dtype=dtype)
        return {k: e["uuid"] for k, e in read_manifest(folder).items()}

    first = uuids(h5)
    assert uuids(h5) == first  # stable across runs
    assert all(u.startswith("vx-") and u.replace("-", "").isalnum() for u in first.values())  # a safe file name
    same = tmp_path / "same"
    shutil.copytree(inputs, same)
    again = vitcore.extract([same], tmp_path / "same.h5", weights=str(ckpt), fps=2.0, **EXACT).output
    assert uuids(again) == first  # the same bytes, settings and weights elsewhere: the same tokens, the same uuid
    changed = tmp_path / "changed"
    shutil.copytree(inputs, changed)
    Image.open(changed / "wide.png").rotate(180).save(changed / "wide.png")
    other = uuids(vitcore.extract([changed], tmp_path / "b.h5", weights=str(ckpt), fps=2.0, **EXACT).output)
    assert other["wide.png"] != first["wide.png"] and other["tall.png"] == first["tall.png"]
    settings = uuids(vitcore.extract([inputs], tmp_path / "s.h5", weights=str(ckpt), fps=1.0, **EXACT).output)
    assert settings["clip.mp4"] != first["clip.mp4"]  # other frames sampled
    assert uuids(h5, dtype="bfloat16")["wide.png"] != first["wide.png"]
    retrained = tmp_path / "w2"
    shutil.copytree(ckpt, retrained)
    index = json.loads((retrained / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(n for n in index if "visual" in n and n.endswith("merger.mlp.2.bias"))
    shard = retrained / index[name]
    tensors = load_file(shard)
    tensors[name] = tensors[name] + 0.01  # the same checkpoint, one parameter trained a little further
    save_file(tensors, shard, metadata={"format": "pt"})
    weights = vitcore.extract([inputs], tmp_path / "w.h5", weights=str(retrained), fps=2.0, **EXACT).output
    assert uuids(weights)["wide.png"] != first["wide.png"]


def test_a_rerun_keeps_complete_files_and_never_leaves_half_a_file(made, tmp_path, monkeypatch):
    _, h5, _ = made["qwen3-vl"]
    folder = tmp_path / "c"
    write_vllm_cache(h5, folder, dtype="float16")
    manifest = read_manifest(folder)
    cut = folder / manifest["tall.png"]["uuid"] / CACHE_FILE
    cut.write_bytes(cut.read_bytes()[:100])  # cut short (a crash of another writer)
    (folder / manifest["wide.png"]["uuid"] / CACHE_FILE).unlink()
    again = write_vllm_cache(h5, folder, dtype="float16")
    assert again.written == 2 and again.kept == 1
    assert load_file(cut)["ec_cache"].dtype == torch.float16

    import safetensors.torch

    def crash(tensors, filename):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 10)  # part of a file, then the process dies
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        write_vllm_cache(h5, tmp_path / "d")
    assert not list((tmp_path / "d").rglob(CACHE_FILE)) and not list((tmp_path / "d").rglob("*.partial-*"))


def test_what_vllm_cannot_take_is_refused(made, tmp_path):
    _, _, inputs = made["qwen3-vl"]
    ckpt = made["qwen3-vl"][0]
    pictures = tmp_path / "p"
    pictures.mkdir()
    shutil.copy(SAMPLES / "coffee.jpg", pictures)
    cases = [
        (dict(weights=str(ckpt), features=("deepstack",), pool="mean"), "holds pooled vectors"),
        (dict(weights=str(ckpt)), "has no DeepStack features"),
        (dict(model="small"), "vLLM's encoder cache takes"),
    ]
    for i, (options, words) in enumerate(cases):
        out = vitcore.extract([pictures], tmp_path / f"{i}.h5", **{**EXACT, **options}).output
        with pytest.raises(UsageError, match=words):
            write_vllm_cache(out, tmp_path / f"c{i}")
    with pytest.raises(UsageError, match="'gone.png' is not a row"):
        write_vllm_cache(made["qwen3-vl"][1], tmp_path / "c", keys=["gone.png"])
    with pytest.raises(UsageError, match="the cache is written as"):
        write_vllm_cache(made["qwen3-vl"][1], tmp_path / "c", dtype="int8")


def test_the_command_writes_the_cache_and_says_what_it_did(made, cli, tmp_path):
    _, h5, _ = made["qwen2-vl"]
    first = cli("vllm-cache", h5, tmp_path / "c", "--dtype", "bfloat16", "--json")
    assert first.exit_code == 0 and json.loads(first.output) == {
        "folder": str(tmp_path / "c"), "written": 3, "kept": 0, "dtype": "bfloat16",
        "manifest": str(tmp_path / "c" / "manifest.jsonl"), "rows": 3}
    again = cli("vllm-cache", h5, tmp_path / "c", "--dtype", "bfloat16", "--key", "wide.png")
    assert again.exit_code == 0 and "1 row → " in again.output and "0 cache files written, 1 already there" in again.output
    refused = cli("vllm-cache", h5, tmp_path / "c", "--key", "gone.png")
    assert refused.exit_code != 0 and "error: 'gone.png' is not a row of" in refused.output
