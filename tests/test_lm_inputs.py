"""Cached tokens feed the language model: the logits from text + tokens read back from a vit-extract
file equal the full transformers model's logits from the pixels; a DataLoader over the file works
with every start method."""

from __future__ import annotations

import multiprocessing
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitcore
from tests.helpers import BACKENDS, TINY, auto_processor, processor_class, save_tiny_qwen2vl, save_tiny_qwen3vl
from vitcore.errors import UsageError

transformers = pytest.importorskip("transformers")

SPECIAL = dict(image_token_id=4000, video_token_id=4001, vision_start_token_id=4002, vision_end_token_id=4003)
EXACT = dict(dtype="float32", out_dtype="float32", device="cpu", workers=0)


@pytest.fixture(scope="module", params=[(f, b) for f in ("qwen3-vl", "qwen2.5-vl") for b in BACKENDS],
                ids=lambda p: "/".join(p))
def cached(request, tmp_path_factory):
    """(family, the full model, the pixel inputs per image name from transformers' processor of the
    backend the file was made with, the token file)."""
    family, backend = request.param
    processor_class(backend)  # installed, or skipped
    root = tmp_path_factory.mktemp(family)
    folder = root / "ckpt"
    if family == "qwen3-vl":
        save_tiny_qwen3vl(folder)
        model_class, features = transformers.Qwen3VLForConditionalGeneration, ("deepstack",)
    else:
        save_tiny_qwen2vl(folder, "2.5")
        model_class, features = transformers.Qwen2_5_VLForConditionalGeneration, ()
    images = root / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in (("wide.png", (300, 200)), ("tall.png", (180, 420))):  # different grids
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name)
    out = root / "tokens.h5"
    vitcore.extract([images], out, weights=str(folder), features=features, processor=backend, **EXACT)
    # The token ids the tiny vocabulary has room for (the defaults lie past its 4,096 entries).
    model = model_class.from_pretrained(folder, **SPECIAL).eval()
    processor = auto_processor(folder, backend)
    pixels = {name: processor(images=[Image.open(images / name).convert("RGB")], return_tensors="pt")
              for name in ("wide.png", "tall.png")}
    return family, model, pixels, out


def _prompt(grids) -> tuple[torch.Tensor, torch.Tensor]:
    """Text, then for each image <vision_start> <image_pad> × merged tokens <vision_end>, then text."""
    sequence = [5, 6, 7]
    for t, h, w in grids.tolist():
        sequence += [SPECIAL["vision_start_token_id"]] + [SPECIAL["image_token_id"]] * (t * h * w // 4)
        sequence += [SPECIAL["vision_end_token_id"], 8, 9]
    input_ids = torch.tensor([sequence])
    return input_ids, (input_ids == SPECIAL["image_token_id"]).long()  # mm_token_type_ids: 1 for image


def _from_pixels(model, pixels, names):
    grid = torch.cat([pixels[n]["image_grid_thw"] for n in names])
    values = torch.cat([pixels[n]["pixel_values"] for n in names])
    input_ids, types = _prompt(grid)
    with torch.no_grad():
        return model(input_ids=input_ids, pixel_values=values, image_grid_thw=grid, mm_token_type_ids=types).logits


def _from_cache(model, outputs, grid):
    input_ids, types = _prompt(grid)
    with torch.no_grad():
        return model(input_ids=input_ids, image_grid_thw=grid, mm_encoder_outputs={"image": outputs},
                     mm_token_type_ids=types).logits


def _relative(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("names", [["wide.png"], ["tall.png", "wide.png"]])
def test_logits_from_cached_tokens_equal_logits_from_pixels(cached, names):
    family, model, pixels, out = cached
    reference = _from_pixels(model, pixels, names)
    outputs, grid = vitcore.encoder_outputs(out, names)
    assert torch.equal(grid, torch.cat([pixels[n]["image_grid_thw"] for n in names]))
    assert _relative(reference, _from_cache(model, outputs, grid)) < 1e-4

    if len(names) == 2:  # the check can fail: the images' tokens in the wrong order
        swapped, _ = vitcore.encoder_outputs(out, names[::-1])  # read in the other order, fed with this grid
        assert _relative(reference, _from_cache(model, swapped, grid)) > 1e-2
    wrong = outputs.pooler_output[0].flip(0)  # tokens of one image out of raster order
    shuffled, _ = vitcore.encoder_outputs(out, names)
    shuffled.pooler_output = (wrong, *shuffled.pooler_output[1:])
    assert _relative(reference, _from_cache(model, shuffled, grid)) > 1e-2
    if family == "qwen3-vl":  # one DeepStack level perturbed (the tiny language model has one layer: level 0)
        perturbed, _ = vitcore.encoder_outputs(out, names)
        level = perturbed.deepstack_features[0]
        perturbed.deepstack_features[0] = (level[0] * 1.5, *level[1:])
        assert _relative(reference, _from_cache(model, perturbed, grid)) > 1e-3


def test_tokens_are_placed_as_the_model_places_its_own(cached):
    """place_image_tokens (for models or versions without mm_encoder_outputs) builds exactly the
    inputs_embeds the model's own forward hands its language model."""
    _, model, pixels, out = cached
    names = ["tall.png", "wide.png"]
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        _from_pixels(model, pixels, names)
    finally:
        hook.remove()
    outputs, grid = vitcore.encoder_outputs(out, names)
    input_ids, _ = _prompt(grid)
    placed = vitcore.place_image_tokens(model.get_input_embeddings()(input_ids).detach(), input_ids,
                                        SPECIAL["image_token_id"], outputs.pooler_output)
    assert _relative(seen["embeds"], placed) < 1e-5
    with pytest.raises(UsageError, match="image-token positions"):
        vitcore.place_image_tokens(placed, input_ids, SPECIAL["image_token_id"], outputs.pooler_output[:1])


def test_vllm_embeds_hold_the_tokens_then_each_deepstack_level(cached):
    family, _, _, out = cached
    outputs, grid = vitcore.encoder_outputs(out, ["wide.png", "tall.png"])
    with vitcore.open_tokens(out) as f:
        backend = f.settings["preprocessing"]["backend"]
    with warnings.catch_warnings(record=True) as caught:  # vLLM's pixels come from the torchvision backend
        warnings.simplefilter("always")
        embeds = vitcore.vllm_image_embeds(out, ["wide.png", "tall.png"])
    said = [str(w.message) for w in caught if "vLLM makes its own pixels" in str(w.message)]
    assert len(said) == (backend == "pil") and all("--processor pil" in text for text in said)
    tokens = torch.cat(outputs.pooler_output)
    levels = getattr(outputs, "deepstack_features", None) or []
    assert embeds["image_grid_thw"].dtype == torch.int64 and torch.equal(embeds["image_grid_thw"], grid)
    assert embeds["image_embeds"].shape == (int(grid.prod(-1).sum()) // 4, tokens.shape[1] * (1 + len(levels)))
    width = tokens.shape[1]
    assert torch.equal(embeds["image_embeds"][:, :width], tokens)
    for j, level in enumerate(levels):
        assert torch.equal(embeds["image_embeds"][:, width * (j + 1): width * (j + 2)], torch.cat(level))


def test_refusals_are_one_line(tmp_path, cached):
    family, _, _, out = cached
    seed = tmp_path / "seed.h5"
    vitcore.extract([out.parent / "imgs"], seed, model=TINY, **EXACT)
    with pytest.raises(UsageError, match="seed encoder"):
        vitcore.encoder_outputs(seed)
    if family == "qwen3-vl":
        plain = tmp_path / "plain.h5"
        vitcore.extract([out.parent / "imgs"], plain, weights=str(out.parent / "ckpt"), **EXACT)
        with pytest.raises(UsageError, match="--features deepstack"):
            vitcore.encoder_outputs(plain)


def _read_all(dataset, method: str | None):
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, num_workers=2 if method else 0, collate_fn=vitcore.collate_tokens,
        multiprocessing_context=multiprocessing.get_context(method) if method else None)
    return list(loader)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_dataloader_over_the_file_works_with_every_start_method(cached, method):
    family, _, _, out = cached
    dataset = vitcore.TokenDataset(out)
    dataset[0]  # the parent has a handle open now: a forked worker must not use it
    direct = _read_all(vitcore.TokenDataset(out), None)
    batches = _read_all(dataset, method)
    assert [b["keys"] for b in batches] == [b["keys"] for b in direct] == [["tall.png", "wide.png"]]
    with vitcore.open_tokens(out) as f:
        expected = np.concatenate([f.tokens("tall.png"), f.tokens("wide.png")])
        counts = [len(f.tokens("tall.png")), len(f.tokens("wide.png"))]
    for got in (batches[0], direct[0]):
        np.testing.assert_array_equal(got["tokens"].numpy(), expected)
        assert got["num_tokens"].tolist() == counts
        assert got["grid_thw"].shape == (2, 3)
        if family == "qwen3-vl":
            assert sorted(got["features"]) == ["features/deepstack_0", "features/deepstack_1", "features/deepstack_2"]
            assert got["features"]["features/deepstack_0"].shape[0] == len(expected)


def test_a_dataset_subset_keeps_the_order_asked_and_carries_captions(tmp_path):
    from tests.test_containers import _pictures, write_shards

    shards = write_shards(tmp_path / "data", _pictures(5), per_shard=5)
    out = tmp_path / "t.h5"
    vitcore.extract([tmp_path / "data"], out, model=TINY, keep="txt", **EXACT)
    keys = ["00000.tar/000000003.png", "00000.tar/000000001.jpg"]
    dataset = vitcore.TokenDataset(out, keys=keys)
    assert len(dataset) == 2 and shards
    item = dataset[0]
    assert item["key"] == keys[0] and item["meta"] == {"txt": "a picture, number 3 ✓"}
    assert item["tokens"].shape == (16, 32)
    batch = vitcore.collate_tokens([dataset[0], dataset[1]])
    assert batch["tokens"].shape == (2, 16, 32) and batch["meta"]["txt"][1] == "a picture, number 1 ✓"
    with pytest.raises(KeyError, match="is not a row of"):
        vitcore.TokenDataset(out, keys=["nope.jpg"])


def test_projected_seed_tokens_are_placed_among_text_embeddings(tmp_path):
    """The seed document's last step: projected visual tokens beside the text tokens."""
    from tests.helpers import SAMPLES

    out = tmp_path / "seed.h5"
    vitcore.extract([SAMPLES / "chelsea.jpg", SAMPLES / "coffee.jpg"], out, model=TINY, project_dim=40, **EXACT)
    dataset = vitcore.TokenDataset(out)
    batch = vitcore.collate_tokens([dataset[0], dataset[1]])
    tokens = batch["tokens"]  # (2, 16, 40): the language model's width
    image_id, text = 7, torch.arange(100, 110)
    input_ids = torch.cat([text[:3], torch.full((16,), image_id), text[3:6], torch.full((16,), image_id), text[6:]])[None]
    embeds = torch.randn(1, input_ids.shape[1], 40)
    placed = vitcore.place_image_tokens(embeds, input_ids, image_id, list(tokens))
    images = input_ids[0] == image_id
    assert torch.equal(placed[0, images], tokens.reshape(32, 40))
    assert torch.equal(placed[0, ~images], embeds[0, ~images])


def test_a_batch_feeds_the_model_as_the_file_does(cached):
    """encoder_outputs_from_batch: a DataLoader batch of the file → the same model inputs."""
    family, model, pixels, out = cached
    names = ["tall.png", "wide.png"]
    batch = vitcore.collate_tokens([vitcore.TokenDataset(out, keys=names)[i] for i in range(2)])
    outputs, grid = vitcore.encoder_outputs_from_batch(batch)
    assert _relative(_from_pixels(model, pixels, names), _from_cache(model, outputs, grid)) < 1e-4


def test_rows_by_key_or_number_and_what_is_refused(cached, tmp_path, monkeypatch):
    family, _, _, out = cached
    by_key, _ = vitcore.encoder_outputs(out, "wide.png")
    with vitcore.open_tokens(out) as f:
        row = f.index("wide.png")
    by_row, _ = vitcore.encoder_outputs(out, [np.int64(row)])
    assert torch.equal(by_key.pooler_output[0], by_row.pooler_output[0])
    assert vitcore.TokenDataset(out, keys=[row]).keys == ["wide.png"] == vitcore.TokenDataset(out, keys="wide.png").keys
    for bad, words in (([], "no keys"), ([1.5], "neither a key"), ([True], "neither a key")):
        with pytest.raises(UsageError, match=words):
            vitcore.encoder_outputs(out, bad)
    # The same key under two roots names two rows: refused, rows still reachable by number.
    for root in ("a", "b"):
        (tmp_path / root).mkdir()
        Image.fromarray(np.full((30, 30, 3), 40 if root == "a" else 200, np.uint8)).save(tmp_path / root / "x.png")
    twice = tmp_path / "twice.h5"
    vitcore.extract([tmp_path / "a", tmp_path / "b"], twice, model=TINY, **EXACT)
    with pytest.raises(UsageError, match="names 2 rows"):
        vitcore.TokenDataset(twice, keys=["x.png"])
    picked = vitcore.TokenDataset(twice, keys=[1, 0])
    with vitcore.open_tokens(twice) as f:
        rows = [f.tokens(1), f.tokens(0)]  # b/x.png (grey 200), then a/x.png (grey 40)
        roots = [f.settings["roots"][int(f.h5["root_index"][r])] for r in (1, 0)]
    assert not np.array_equal(rows[0], rows[1]) and [os.path.basename(r) for r in roots] == ["b", "a"]
    for i, row in enumerate(rows):  # each item is the row asked for, in the order asked
        np.testing.assert_array_equal(np.asarray(picked[i]["tokens"]), row)
    # A relative path keeps naming the file after the working directory changes.
    monkeypatch.chdir(out.parent)
    dataset = vitcore.TokenDataset(out.name)
    monkeypatch.chdir(tmp_path)
    assert dataset[0]["key"] == "tall.png"


def test_a_file_rewritten_under_a_dataset_is_refused_not_misread(tmp_path):
    from tests.helpers import SAMPLES

    out = tmp_path / "t.h5"
    vitcore.extract([SAMPLES / "chelsea.jpg"], out, model=TINY, **EXACT)
    dataset = vitcore.TokenDataset(out)
    vitcore.extract([SAMPLES / "coffee.jpg"], out, model=TINY, overwrite=True, **EXACT)
    with pytest.raises(vitcore.VitExtractError, match="has changed since this TokenDataset was made"):
        dataset[0]


def test_a_merged_file_whose_shard_went_missing_is_refused_not_read_as_nan(tmp_path):
    from tests.helpers import SAMPLES
    from vitcore.store.merge import merge
    from vitcore.run.shard import shard_path

    out = tmp_path / "m.h5"
    parts = [shard_path(str(out), i, 2) for i in range(2)]
    for i, part in enumerate(parts):
        vitcore.extract([SAMPLES], part, model=TINY, shard=(i, 2), **EXACT)
    merge(str(out), parts, virtual=True)
    dataset = vitcore.TokenDataset(out)
    Path(parts[1]).rename(tmp_path / "moved.h5")
    with pytest.raises(vitcore.VitExtractError, match="missing"):
        dataset[len(dataset) - 1]


def test_image_tokens_are_taken_as_arrays_or_batches_too():
    embeds, ids = torch.zeros(1, 8, 4), torch.tensor([[1, 7, 7, 2, 7, 7, 7, 3]])
    tokens = np.arange(20, dtype=np.float32).reshape(5, 4)
    for given in (tokens, [tokens[:2], tokens[2:]], torch.from_numpy(tokens)[None]):
        placed = vitcore.place_image_tokens(embeds, ids, 7, given)
        assert torch.equal(placed[0, ids[0] == 7], torch.from_numpy(tokens))
    with pytest.raises(UsageError, match="no image tokens"):
        vitcore.place_image_tokens(embeds, ids, 7, [])
