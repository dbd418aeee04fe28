"""Video clips for the Qwen-VL families against transformers' own video processors (the oracle):
the frames sampled, their size, the patches bit for bit, the grid, and the timing each language
model is given. Both sides read the same clip with PyAV."""

from __future__ import annotations

import json

import pytest
import torch

av = pytest.importorskip("av")
pytest.importorskip("torchvision", reason="transformers' torchvision backend needs torchvision")  # video processors
import transformers  # noqa: E402
from transformers.video_utils import load_video  # noqa: E402

from tests.helpers import make_clip
from vitcore.encoders.qwen.video import patchify_video, resize_frames, video_settings  # noqa: E402
from vitcore.imaging.video import clip_info, open_clip, read_frames  # noqa: E402

KINDS = {"qwen2": ("qwen2_vl", transformers.Qwen2VLVideoProcessor), "qwen3": ("qwen3_vl", transformers.Qwen3VLVideoProcessor)}


def checkpoint(folder, kind: str, video: dict | None = None, image: dict | None = None):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": KINDS[kind][0]}))
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Qwen2VLImageProcessor", **(image or {})}))
    if video is not None:
        (folder / "video_preprocessor_config.json").write_text(json.dumps(
            {"video_processor_type": KINDS[kind][1].__name__, **video}))
    return str(folder)


def ours(path, prep):
    with open(path, "rb") as handle, open_clip(handle) as container:
        info = clip_info(container)
        indices = prep.frames(info.frames, info.fps)
        frames = read_frames(container, indices)
    size = prep.frame_size(len(indices), info.height, info.width)
    patches, grid = patchify_video(torch.from_numpy(resize_frames(frames, size, prep)), prep)
    return patches, grid, indices, prep.timing(indices, info.frames, info.fps)


def theirs(path, folder, kind, **call):
    processor = transformers.AutoVideoProcessor.from_pretrained(folder)  # the class as transformers resolves it
    video, metadata = load_video(path, backend="pyav")
    out = processor(videos=[video], video_metadata=[metadata], return_tensors="pt", return_metadata=True, **call)
    (meta,) = out["video_metadata"]
    return out["pixel_values_videos"], tuple(out["video_grid_thw"][0].tolist()), meta


CLIPS = [(9, 90, 166, 25), (12, 64, 48, 10), (37, 120, 70, 30), (5, 200, 40, 24)]
SETTINGS = {  # name → (kind, video_preprocessor_config.json or None, image processor's, call kwargs)
    "qwen2 defaults (every frame)": ("qwen2", None, dict(min_pixels=3136, max_pixels=40000), {}),
    # a Qwen3-VL checkpoint without a video processor file: transformers infers Qwen2VLVideoProcessor
    # from its image processor's type (Qwen2VLImageProcessor), so every frame, Qwen2-VL's resize
    "qwen3 checkpoint, no video file": ("qwen3", None, dict(patch_size=16, size={"shortest_edge": 4096,
                                                                                 "longest_edge": 90000}), {}),
    "qwen2 sampled at 4 fps": ("qwen2", dict(size={"shortest_edge": 3136, "longest_edge": 30000}, do_sample_frames=True,
                                             fps=4, min_frames=2), None, {}),
    "qwen2 capped per frame": ("qwen2", dict(size={"shortest_edge": 1000, "longest_edge": 80000}, cap_pixels_per_frame=True,
                                             max_video_tokens=600), None, {}),
    "qwen3 defaults (2 fps)": ("qwen3", dict(size={"shortest_edge": 4096, "longest_edge": 300000}, patch_size=16), None,
                               {}),
    "qwen3 at 6 fps, max 10 frames": ("qwen3", dict(size={"shortest_edge": 4096, "longest_edge": 200000}, fps=6,
                                                    max_frames=10, min_frames=3), None, {}),
    "qwen3 capped per frame": ("qwen3", dict(size={"shortest_edge": 2048, "longest_edge": 900000},
                                             cap_pixels_per_frame=True, max_video_tokens=40), None, {}),
}


@pytest.mark.parametrize("clip", CLIPS, ids=lambda c: f"{c[0]}f-{c[2]}x{c[1]}-{c[3]}fps")
@pytest.mark.parametrize("name", list(SETTINGS))
def test_patches_grid_and_timing_equal_transformers_video_processor(tmp_path, clip, name):
    kind, video, image, call = SETTINGS[name]
    frames, height, width, fps = clip
    path = make_clip(tmp_path / "clip.mp4", frames, width, height, fps)
    folder = checkpoint(tmp_path / "ckpt", kind, video, image)
    prep = video_settings(folder, kind)
    if kind == "qwen3" and len(prep.frames(frames, fps)) < 2:
        pytest.fail("a clip too short for the test")
    ref, ref_grid, meta = theirs(path, folder, kind, **call)
    patches, grid, indices, timing = ours(path, prep)
    assert prep.kind == ("qwen2" if video is None else kind)
    assert list(indices) == [int(i) for i in meta.frames_indices]
    assert grid == ref_grid
    assert patches.dtype == ref.dtype and torch.equal(patches, ref)  # bit for bit
    # Qwen2.5-VL's second_per_grid_ts and Qwen3-VL's prompt timestamps, from transformers' own processors
    assert timing["second_per_grid_t"] == pytest.approx(prep.temporal_patch_size / meta.sampled_fps, rel=1e-12)
    sampled = [int(i) for i in meta.frames_indices]
    stamps = transformers.Qwen3VLProcessor._calculate_timestamps(None, sampled, meta.fps, prep.temporal_patch_size)
    assert timing["timestamps"] == pytest.approx([float(s) for s in stamps], rel=1e-12)


# -- whole runs: tokens of clips equal transformers' video processor + vision tower -------------------
@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    from tests.helpers import save_tiny_qwen2vl, save_tiny_qwen3vl

    root = tmp_path_factory.mktemp("video_towers")
    made = {"qwen3-vl": (root / "q3", save_tiny_qwen3vl(root / "q3"), "qwen3"),
            "qwen2-vl": (root / "q2", save_tiny_qwen2vl(root / "q2", "2"), "qwen2"),
            "qwen2.5-vl": (root / "q25", save_tiny_qwen2vl(root / "q25", "2.5"), "qwen2")}
    # Qwen3-VL with a video processor of its own, sampling at 6 fps; Qwen2.5-VL's samples at 4 fps
    (root / "q3" / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Qwen3VLVideoProcessor", "size": {"shortest_edge": 4096, "longest_edge": 200000},
         "fps": 6, "min_frames": 3}))
    (root / "q25" / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Qwen2VLVideoProcessor", "size": {"shortest_edge": 3136, "longest_edge": 60000},
         "do_sample_frames": True, "fps": 4, "min_frames": 2}))
    return made


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen2-vl", "qwen2.5-vl"])
def test_a_run_stores_clip_tokens_equal_to_transformers(towers, tmp_path, family):
    import h5py

    import vitcore
    from vitcore.run.pipeline import ExtractOptions

    folder, visual, kind = towers[family]
    clips = tmp_path / "clips"
    clips.mkdir()
    made = {"even.mp4": make_clip(clips / "even.mp4", 12, 90, 64, 10),
            "odd.mov": make_clip(clips / "odd.mov", 9, 64, 120, 25, codec="mpeg4")}
    out = tmp_path / "v.h5"
    result = vitcore.extract([clips], out, ExtractOptions(weights=str(folder), dtype="float32", out_dtype="float32",
                                                          workers=0))
    assert result.complete and result.written == 2 and not result.failures
    processor = KINDS[kind][1].from_pretrained(str(folder))
    with h5py.File(out) as f:
        keys = list(f["paths"].asstr()[:])
        for row, key in enumerate(keys):
            video, metadata = load_video(made[key], backend="pyav")
            ref = processor(videos=[video], video_metadata=[metadata], return_tensors="pt", return_metadata=True)
            with torch.no_grad():
                tokens = visual(ref["pixel_values_videos"], grid_thw=ref["video_grid_thw"]).pooler_output
            start, count = int(f["token_offset"][row]), int(f["num_tokens"][row])
            ours = torch.from_numpy(f["tokens"][start:start + count])
            assert f["grid_thw"][row].tolist() == ref["video_grid_thw"][0].tolist()
            assert (torch.linalg.norm(ours.double() - tokens.double()) / torch.linalg.norm(tokens.double())) < 1e-4
            record = json.loads(f["meta/video"].asstr()[row])
            assert record["frames"] == [int(i) for i in ref["video_metadata"][0].frames_indices]
        assert f["grid_thw"][:, 0].max() > 1  # temporal patches: a clip of several


# -- the language model on cached clip tokens ---------------------------------------------------------
SPECIAL = dict(image_token_id=4000, video_token_id=4001, vision_start_token_id=4002, vision_end_token_id=4003)


def _video_prompt(grid, per_slice: bool):
    """Text, then the clip: Qwen3-VL writes each temporal patch as its own <start> pads <end> after a
    timestamp (text tokens here); Qwen2.5-VL the whole clip at once. mm_token_type_ids: 2 for video."""
    t, h, w = grid.tolist()[0]
    sequence = [5, 6, 7]
    for _ in range(t) if per_slice else [0]:
        pads = h * w // 4 * (1 if per_slice else t)
        sequence += ([11, 12] if per_slice else []) + [SPECIAL["vision_start_token_id"]]
        sequence += [SPECIAL["video_token_id"]] * pads + [SPECIAL["vision_end_token_id"]]
    sequence += [8, 9]
    ids = torch.tensor([sequence])
    return ids, (ids == SPECIAL["video_token_id"]).long() * 2


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen2.5-vl"])
def test_logits_from_cached_clip_tokens_equal_logits_from_the_clip(towers, tmp_path, family):
    import vitcore

    folder, _, kind = towers[family]
    clips = tmp_path / "clips"
    clips.mkdir()
    path = make_clip(clips / "c.mp4", 14, 90, 64, 10)
    features = ("deepstack",) if family == "qwen3-vl" else ()
    out = vitcore.extract([clips], tmp_path / "v.h5", weights=str(folder), features=features, dtype="float32",
                          out_dtype="float32", workers=0).output
    model_class = (transformers.Qwen3VLForConditionalGeneration if family == "qwen3-vl"
                   else transformers.Qwen2_5_VLForConditionalGeneration)
    model = model_class.from_pretrained(folder, **SPECIAL).eval()
    video, metadata = load_video(path, backend="pyav")
    pixels = KINDS[kind][1].from_pretrained(str(folder))(videos=[video], video_metadata=[metadata],
                                                         return_tensors="pt", return_metadata=True)
    grid = pixels["video_grid_thw"]
    ids, types = _video_prompt(grid, per_slice=family == "qwen3-vl")
    spg = torch.tensor([2 / pixels["video_metadata"][0].sampled_fps])
    extra = {} if family == "qwen3-vl" else {"second_per_grid_ts": spg}
    with torch.no_grad():
        reference = model(input_ids=ids, pixel_values_videos=pixels["pixel_values_videos"], video_grid_thw=grid,
                          mm_token_type_ids=types, **extra).logits
    outputs, cached_grid = vitcore.encoder_outputs(out, "c.mp4")
    timing = vitcore.video_timing(out, "c.mp4")
    assert torch.equal(cached_grid, grid) and grid[0, 0] > 1
    assert timing["second_per_grid_ts"].tolist() == pytest.approx(spg.tolist())

    def cached(**timing_args):
        with torch.no_grad():
            return model(input_ids=ids, video_grid_thw=cached_grid, mm_encoder_outputs={"video": outputs},
                         mm_token_type_ids=types, **timing_args).logits

    relative = lambda a, b: float((a - b).abs().max() / a.abs().max())  # noqa: E731
    if family == "qwen2.5-vl":
        assert relative(reference, cached(second_per_grid_ts=timing["second_per_grid_ts"])) < 1e-4
        # the check can fail: the clip's timing matters to Qwen2.5-VL's positions
        assert relative(reference, cached(second_per_grid_ts=timing["second_per_grid_ts"] * 3)) > 1e-3
    else:
        assert relative(reference, cached()) < 1e-4
        assert len(timing["timestamps"][0]) == grid[0, 0]
    outputs.pooler_output = (outputs.pooler_output[0].flip(0),)  # the tokens out of order: other logits
    assert relative(reference, cached(**({} if family == "qwen3-vl" else {"second_per_grid_ts": spg}))) > 1e-2
