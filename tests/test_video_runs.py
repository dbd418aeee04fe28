"""Runs over folders with video clips, Qwen-VL families: clips beside pictures, their grids and
recorded timing, failures, resume, shards + merge, --fps / --max-frames, and what other families do
with clips. (Tokens equal to transformers' video processor + tower: test_qwen_video.py.)"""

from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

import vitcore  # noqa: E402
from tests.helpers import SAMPLES, TINY, make_clip, save_tiny_qwen2vl, save_tiny_qwen3vl  # noqa: E402
from vitcore.errors import ResumeMismatchError, UsageError  # noqa: E402
from vitcore.run.pipeline import ExtractOptions  # noqa: E402


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("q3") / "ckpt"
    save_tiny_qwen3vl(folder)
    (folder / "video_preprocessor_config.json").write_text(json.dumps(  # as released Qwen3-VL checkpoints have
        {"video_processor_type": "Qwen3VLVideoProcessor", "size": {"shortest_edge": 4096, "longest_edge": 200000}}))
    return folder


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("q2") / "ckpt"
    save_tiny_qwen2vl(folder, "2")
    return folder


@pytest.fixture
def mixed(tmp_path):
    """Two clips, a picture, a broken clip and an audio-only file named .mp4."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    make_clip(folder / "a.mp4", 12, 90, 64, 10)
    make_clip(folder / "b.webm", 7, 64, 48, 8, codec="libvpx")
    shutil.copy(SAMPLES / "coffee.jpg", folder / "c.jpg")
    (folder / "d.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(40))
    (folder / "f.mp4").write_bytes(b"")  # zero bytes
    with av.open(str(folder / "e.mp4"), "w") as out:
        stream = out.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    return folder


def _opts(folder, **more):
    return ExtractOptions(weights=str(folder), dtype="float32", out_dtype="float32", workers=0, batch_size=2, **more)


def _rows(path) -> dict:
    with h5py.File(path) as f:
        keys = list(f["paths"].asstr()[:])
        grids, videos = f["grid_thw"][:], list(f["meta/video"].asstr()[:])
        offsets, counts, tokens = f["token_offset"][:], f["num_tokens"][:], f["tokens"][:]
        failed = dict(zip(f["failed/paths"].asstr()[:], f["failed/errors"].asstr()[:]))
    rows = {k: (tuple(g), json.loads(v) if v else None, tokens[o:o + c]) for k, g, v, o, c in
            zip(keys, grids, videos, offsets, counts)}
    return {"rows": rows, "failed": failed}


def test_clips_beside_pictures_with_their_grids_timing_and_failures(qwen3, mixed, tmp_path):
    result = vitcore.extract([mixed], tmp_path / "v.h5", _opts(qwen3))
    assert result.complete and result.written == 3
    got = _rows(result.output)
    assert set(got["rows"]) == {"a.mp4", "b.webm", "c.jpg"}
    grid, video, tokens = got["rows"]["a.mp4"]
    # Qwen3-VL's processor: 2 fps over 12 frames at 10 fps → 2 frames, raised to min_frames 4 → t = 2
    assert grid[0] == 2 and video["frames"] == [0, 4, 7, 11] and video["fps"] == 10.0 and video["frames"]
    assert video["timestamps"] == pytest.approx([0.2, 0.9]) and video["duration"] == pytest.approx(1.2)
    assert tokens.shape[0] == grid[0] * grid[1] * grid[2] // 4
    assert got["rows"]["b.webm"][1]["frames"] == [0, 2, 4, 6]  # WebM: frames counted by decoding
    assert got["rows"]["c.jpg"][0][0] == 1 and got["rows"]["c.jpg"][1] is None  # a picture: t = 1, no video record
    assert set(got["failed"]) == {"d.mp4", "e.mp4", "f.mp4"}
    assert "VideoError" in got["failed"]["d.mp4"] and "no video stream" in got["failed"]["e.mp4"]
    assert "VideoError: the file is empty (0 bytes)" in got["failed"]["f.mp4"]  # as a picture says
    with h5py.File(result.output) as f:
        assert json.loads(f.attrs["preprocessing"])["video"]["fps"] == 2.0


def test_the_summary_and_info_count_clips_apart_from_pictures(cli, qwen3, mixed, tmp_path):
    out = tmp_path / "v.h5"
    result = cli("run", mixed, "-o", out, "--weights", qwen3, "--dtype", "float32", "--workers", "0", "--progress", "lines")
    assert result.exit_code == 0, result.output
    assert "progress: 6/6 inputs (100 %)" in result.output and "inputs/s" in result.output
    assert "done: 1 image and 2 clips → " in result.output and "per image or clip" in result.output
    shown = cli("info", out)
    assert "3 (2 of them video clips)" in shown.output
    assert json.loads(cli("info", out, "--json").output)["clips"] == 2
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    shutil.copy(mixed / "c.jpg", pictures / "c.jpg")
    alone = cli("run", pictures, "-o", tmp_path / "p.h5", "--weights", qwen3, "--workers", "0", "--progress", "lines")
    assert "done: 1 image → " in alone.output and "clip" not in alone.output  # a picture-only run as before
    assert json.loads(cli("info", tmp_path / "p.h5", "--json").output)["clips"] == 0


def test_resume_and_shards_give_the_single_run(qwen3, mixed, tmp_path):
    whole = _rows(vitcore.extract([mixed], tmp_path / "whole.h5", _opts(qwen3)).output)
    growing = tmp_path / "growing"
    growing.mkdir()
    for name in ("a.mp4", "c.jpg"):
        shutil.copy(mixed / name, growing / name)
    out = tmp_path / "resumed.h5"
    vitcore.extract([growing], out, _opts(qwen3))
    for name in ("b.webm", "d.mp4", "e.mp4", "f.mp4"):  # more clips arrive; the run goes on
        shutil.copy(mixed / name, growing / name)
    again = vitcore.extract([growing], out, _opts(qwen3), resume=True)
    assert again.skipped == 2 and again.written == 1
    shards = [vitcore.extract([mixed], tmp_path / f"s{i}.h5", _opts(qwen3), shard=(i, 2)).output for i in range(2)]
    merged = tmp_path / "merged.h5"
    from vitcore.store.merge import merge

    merge(str(merged), shards)
    for path in (out, merged):
        got = _rows(path)
        assert set(got["rows"]) == set(whole["rows"]) and set(got["failed"]) == set(whole["failed"])
        for key, (grid, video, tokens) in whole["rows"].items():
            assert got["rows"][key][0] == grid and got["rows"][key][1] == video
            np.testing.assert_array_equal(got["rows"][key][2], tokens)


def test_a_pictures_only_file_does_not_take_clips_on_resume(qwen3, mixed, tmp_path):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    shutil.copy(mixed / "c.jpg", pictures / "c.jpg")
    out = vitcore.extract([pictures], tmp_path / "p.h5", _opts(qwen3)).output
    with h5py.File(out) as f:
        assert "video" not in json.loads(f.attrs["preprocessing"])  # as files made before clips were read
    shutil.copy(mixed / "a.mp4", pictures / "a.mp4")
    with pytest.raises(UsageError, match="made from pictures alone, so clips cannot join it"):
        vitcore.extract([pictures], out, _opts(qwen3), resume=True)


def test_a_file_with_clips_goes_on_with_pictures_alone(qwen3, mixed, tmp_path):
    out = vitcore.extract([mixed], tmp_path / "v.h5", _opts(qwen3)).output
    more = tmp_path / "more"
    more.mkdir()
    shutil.copy(SAMPLES / "rocket.jpg", more / "rocket.jpg")
    again = vitcore.extract([more], out, _opts(qwen3), resume=True)  # no clips among these inputs
    assert again.written == 1 and _rows(out)["rows"]["rocket.jpg"][1] is None


def test_what_clips_cannot_take_is_refused_before_any_work(qwen2, qwen3, mixed, tmp_path):
    out = tmp_path / "never.h5"
    refused = [
        (_opts(qwen3, resolution="64"), "--resolution 64 sizes pictures"),
        (_opts(qwen2, max_frames=8), "give --fps too"),
        (_opts(qwen2, fps=float("nan")), "--fps must be a number above 0"),
        (_opts(qwen2, fps=float("inf")), "--fps must be a number above 0"),
        (ExtractOptions(model=TINY, workers=0, extensions="mp4,jpg"), "clips are read by the Qwen-VL families only"),
    ]
    for options, words in refused:
        with pytest.raises(UsageError, match=words.replace("(", r"\(")):
            vitcore.extract([mixed], out, options)
        assert not out.exists()
    with pytest.raises(UsageError, match="clips are read by the Qwen-VL families only"):  # named one by one
        vitcore.extract([mixed / "a.mp4"], out, ExtractOptions(model=TINY, workers=0))
    only_clips = tmp_path / "only"
    only_clips.mkdir()
    shutil.copy(mixed / "a.mp4", only_clips / "a.mp4")
    with pytest.raises(UsageError, match="no images found.*1 video clip passed over"):
        vitcore.extract([only_clips], out, ExtractOptions(model=TINY, workers=0))


def test_fps_and_max_frames_as_the_processor_takes_them(qwen2, tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    make_clip(clips / "a.mp4", 30, 56, 56, 10)
    every = _rows(vitcore.extract([clips], tmp_path / "every.h5", _opts(qwen2)).output)["rows"]["a.mp4"]
    assert every[1]["frames"] == list(range(30)) and every[0][0] == 15  # Qwen2-VL's default: every frame
    sampled = _rows(vitcore.extract([clips], tmp_path / "fps.h5", _opts(qwen2, fps=2.0)).output)["rows"]["a.mp4"]
    assert sampled[1]["frames"] == [0, 5, 10, 15, 20, 25]  # 3 s at 2 fps: arange(0, 30, 5)
    capped = _rows(vitcore.extract([clips], tmp_path / "max.h5", _opts(qwen2, fps=5.0, max_frames=4)).output)
    assert capped["rows"]["a.mp4"][1]["frames"] == [0, 7, 15, 22]
    with pytest.raises(ResumeMismatchError, match="preprocessing"):  # another sampling is another file
        vitcore.extract([clips], tmp_path / "fps.h5", _opts(qwen2, fps=1.0), resume=True)


def test_a_clip_too_long_to_take_every_frame_is_a_record(qwen2, tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    make_clip(clips / "long.mp4", 800, 16, 16, 25, codec="mpeg4")
    make_clip(clips / "short.mp4", 6, 16, 16, 25, codec="mpeg4")
    result = vitcore.extract([clips], tmp_path / "v.h5", _opts(qwen2))
    (key, error), = result.failures
    assert key == "long.mp4" and "800 frames" in error and "`vit-extract run --fps 2`" in error
    # similar has no --fps: the advice names the command that samples, not an option it lacks
    from vitcore.consumers.search import similar
    from vitcore.errors import VitExtractError

    with pytest.raises(VitExtractError, match="800 frames.*`vit-extract run --fps 2` samples"):
        similar(str(tmp_path / "v.h5"), str(clips / "long.mp4"), k=1)


def test_other_families_pass_clips_over_and_refuse_fps(mixed, tmp_path):
    result = vitcore.extract([mixed], tmp_path / "s.h5", ExtractOptions(model=TINY, workers=0))
    assert result.written == 1 and result.passed_over.get("mp4") == 4 and result.passed_over.get("webm") == 1
    with pytest.raises(UsageError, match="--fps and --max-frames are for video clips"):
        vitcore.extract([mixed], tmp_path / "f.h5", ExtractOptions(model=TINY, workers=0, fps=2.0))


def test_a_dry_run_counts_clips_as_inputs_of_their_own_kind(qwen3, mixed, tmp_path):
    from vitcore.run.dry_run import dry_run

    report = dry_run([mixed], str(tmp_path / "v.h5"), _opts(qwen3))
    assert report.inputs == {"video clips": 5, "image files": 1}
    assert report.tokens_counted_from == "1 image headers (all) and 5 clip headers (all)"
    assert any("3 of the headers read could not be read" in note for note in report.notes)  # the broken clips
    # The mean tokens per input, from headers alone, is what the run stores (its 3 failures hold none).
    ran = vitcore.extract([mixed], tmp_path / "v.h5", _opts(qwen3))
    with h5py.File(ran.output) as f:
        assert report.tokens_per_image["tokens"] == pytest.approx(f["num_tokens"][:].mean())
    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(mixed / "a.mp4", clips / "a.mp4")
    alone = dry_run([clips], str(tmp_path / "c.h5"), _opts(qwen3))  # clips alone: no picture to count from
    with h5py.File(vitcore.extract([clips], tmp_path / "c.h5", _opts(qwen3)).output) as f:
        assert alone.tokens_per_image["tokens"] == f["num_tokens"][0] > 1
        assert alone.projected_bytes == pytest.approx(os.path.getsize(tmp_path / "c.h5"), rel=0.05)


def test_clips_in_tar_shards_equal_the_same_clips_on_disk_and_read_back_as_a_dataset(qwen3, mixed, tmp_path):
    import tarfile

    loose = tmp_path / "loose"
    loose.mkdir()
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:  # WebDataset samples: key.mp4, key.txt
        for key, name in (("s000", "a.mp4"), ("s001", "b.webm")):
            shutil.copy(mixed / name, loose / f"{key}.{name.split('.')[1]}")
            tar.add(mixed / name, arcname=f"{key}.{name.split('.')[1]}")
    from_tar = _rows(vitcore.extract([shard], tmp_path / "t.h5", _opts(qwen3)).output)["rows"]
    from_disk = _rows(vitcore.extract([loose], tmp_path / "d.h5", _opts(qwen3)).output)["rows"]
    assert sorted(k.split("/")[-1] for k in from_tar) == sorted(from_disk) == ["s000.mp4", "s001.webm"]
    for key, (grid, video, tokens) in from_tar.items():
        disk = from_disk[key.split("/")[-1]]
        assert grid == disk[0] and video == disk[1]
        np.testing.assert_array_equal(tokens, disk[2])
    dataset = vitcore.TokenDataset(tmp_path / "d.h5")
    item = dataset[0]
    assert item["key"] == "s000.mp4" and tuple(item["grid_thw"].tolist()) == from_disk["s000.mp4"][0]
    assert json.loads(item["meta"]["video"])["frames"] == from_disk["s000.mp4"][1]["frames"]


def test_show_draws_a_clips_first_temporal_patches_beside_their_maps(qwen3, mixed, tmp_path, cli):
    from PIL import Image

    out = vitcore.extract([mixed], tmp_path / "v.h5", _opts(qwen3)).output
    result = cli("show", out, "a.mp4", "c.jpg", "-o", tmp_path / "s.png", "--columns", "1")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "s.png") as sheet:
        wide = sheet.width  # a clip's cell: 2 temporal patches × (frame, map)
    pictures = cli("show", out, "c.jpg", "-o", tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as sheet:
        assert pictures.exit_code == 0 and wide > 1.8 * sheet.width
    (mixed / "a.mp4").unlink()  # the original is gone: placeholders, not a failure
    assert cli("show", out, "a.mp4", "-o", tmp_path / "gone.png").exit_code == 0


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])  # Qwen2-VL without --fps: its clips were not sampled
def test_similar_encodes_a_new_clip_as_the_files_clips_were(family, request, mixed, tmp_path):
    from vitcore.consumers.search import similar

    out = vitcore.extract([mixed], tmp_path / "p.h5", _opts(request.getfixturevalue(family), pool="mean")).output
    query = tmp_path / "query.mp4"
    shutil.copy(mixed / "a.mp4", query)  # outside the file's root: encoded afresh, sampled as a.mp4 was
    hits, kind = similar(str(out), str(query), k=2)
    assert kind == "image" and hits[0].key == "a.mp4" and hits[0].score > 0.9999
    picture, _ = similar(str(out), str(SAMPLES / "coffee.jpg"), k=1)
    assert picture[0].key == "c.jpg" and picture[0].score > 0.9999  # a picture still reads as a picture


def test_info_names_the_video_processor_the_clips_went_through(qwen2, qwen3, mixed, tmp_path, cli):
    sampled = vitcore.extract([mixed], tmp_path / "q3.h5", _opts(qwen3)).output
    every = vitcore.extract([mixed], tmp_path / "q2.h5", _opts(qwen2)).output
    assert "clips: Qwen3VLVideoProcessor, 2 fps, 4–768 frames" in cli("info", sampled).output
    assert "clips: Qwen2VLVideoProcessor, every frame" in cli("info", every).output
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    shutil.copy(mixed / "c.jpg", pictures / "c.jpg")
    assert "clips:" not in cli("info", vitcore.extract([pictures], tmp_path / "p.h5", _opts(qwen3)).output).output


def test_vllm_video_embeds_hold_each_clip_then_its_deepstack_and_timing(qwen2, qwen3, mixed, tmp_path):
    out = vitcore.extract([mixed], tmp_path / "v.h5", _opts(qwen3, features=("deepstack",))).output
    embeds = vitcore.vllm_video_embeds(out, ["b.webm", "a.mp4"])
    outputs, grid = vitcore.encoder_outputs(out, ["b.webm", "a.mp4"])
    assert set(embeds) == {"video_embeds", "video_grid_thw", "timestamps"}
    assert torch.equal(embeds["video_grid_thw"], grid) and grid[:, 0].tolist() == [2, 2]
    levels = [torch.cat(level) for level in outputs.deepstack_features]
    assert torch.equal(embeds["video_embeds"], torch.cat([torch.cat(outputs.pooler_output), *levels], dim=-1))
    assert embeds["timestamps"] == vitcore.video_timing(out, ["b.webm", "a.mp4"])["timestamps"]
    assert all(len(stamps) == t for stamps, t in zip(embeds["timestamps"], grid[:, 0].tolist()))
    with pytest.raises(UsageError, match="'c.jpg' in .* is a picture, not a clip"):
        vitcore.vllm_video_embeds(out, ["a.mp4", "c.jpg"])
    with pytest.raises(UsageError, match="'a.mp4' is a video clip: vLLM takes clips as videos"):
        vitcore.vllm_image_embeds(out)
    assert vitcore.vllm_image_embeds(out, ["c.jpg"])["image_grid_thw"].tolist()[0][0] == 1
    twofive = tmp_path / "q25"
    save_tiny_qwen2vl(twofive, "2.5")
    out = vitcore.extract([mixed], tmp_path / "q25.h5", _opts(twofive, fps=2.0)).output
    embeds = vitcore.vllm_video_embeds(out, ["a.mp4"])
    assert set(embeds) == {"video_embeds", "video_grid_thw", "second_per_grid_ts"}
    assert embeds["second_per_grid_ts"].tolist() == vitcore.video_timing(out, ["a.mp4"])["second_per_grid_ts"].tolist()


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])  # Qwen2-VL took a JPEG named .mp4 as a one-frame clip
def test_a_picture_named_as_a_clip_and_a_clip_named_as_a_picture_say_so(family, request, mixed, tmp_path):
    from vitcore.imaging.sniff import content_kind

    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(mixed / "c.jpg", odd / "photo.mp4")  # a phone's JPEG saved under a clip's name
    shutil.copy(mixed / "a.mp4", odd / "clip.jpg")
    shutil.copy(mixed / "b.webm", odd / "clip.png")
    shutil.copy(mixed / "a.mp4", odd / "fine.mp4")
    (odd / "junk.mp4").write_bytes(b"\x00" * 64)  # neither: its record says nothing more
    failed = _rows(vitcore.extract([odd], tmp_path / "o.h5", _opts(request.getfixturevalue(family))).output)["failed"]
    assert set(failed) == {"photo.mp4", "clip.jpg", "clip.png", "junk.mp4"}
    assert failed["photo.mp4"].endswith("(its content is a picture (JPEG), not a video clip: rename it)")
    assert failed["clip.jpg"].endswith("(its content is a video clip (MP4), not a picture: rename it)")
    assert failed["clip.png"].endswith("(its content is a video clip (Matroska/WebM), not a picture: rename it)")
    assert "its content" not in failed["junk.mp4"]
    # An AVIF or HEIC picture opens with the same ftyp box as an MP4 clip: its brand tells them apart.
    assert content_kind(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00") == ("picture", "AVIF")
    assert content_kind(b"\x00\x00\x00\x1cftypisom\x00\x00\x00\x00") == ("video", "MP4")


def test_clips_left_out_by_ext_for_a_family_that_reads_them_are_said_as_extensions(qwen3, mixed, tmp_path):
    result = vitcore.extract([mixed], tmp_path / "p.h5", _opts(qwen3, extensions="jpg"))
    notes = [w for w in result.warnings if "passed over" in w]
    assert any("passed over by extension (mp4 4, webm 1)" in w for w in notes), notes
    assert not any("Qwen-VL families only" in w for w in notes), notes
