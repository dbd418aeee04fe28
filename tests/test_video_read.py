"""Reading video clips (PyAV): what a clip holds, the frames at chosen indices, and a clear error for
every clip that cannot be one (broken, empty, audio only). Equality with transformers' processors is
in test_qwen_video.py."""

from __future__ import annotations

import io

import numpy as np
import pytest

av = pytest.importorskip("av")

from tests.helpers import make_clip  # noqa: E402
from vitcore.imaging.video import VideoError, clip_info, is_video_name, open_clip, read_frames  # noqa: E402


def _all_frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("codec, suffix", [("libx264", "mp4"), ("mpeg4", "mkv"), ("libvpx", "webm")])
def test_info_and_frames_at_indices(tmp_path, codec, suffix):
    path = make_clip(tmp_path / f"clip.{suffix}", 11, 64, 48, 12, codec=codec)
    every = _all_frames(path)
    with open(path, "rb") as handle, open_clip(handle) as container:
        info = clip_info(container)  # WebM declares no frame count: counted by decoding
        frames = read_frames(container, [0, 3, 3, 10])
    assert (info.frames, info.fps, info.width, info.height) == (11, 12.0, 64, 48)
    assert info.duration == pytest.approx(11 / 12)
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, every[[0, 3, 3, 10]])


def test_a_clip_is_read_from_bytes_in_memory_as_from_a_file(tmp_path):  # tar members arrive as bytes
    path = make_clip(tmp_path / "clip.mp4", 6, 32, 32, 8)
    data = io.BytesIO(open(path, "rb").read())
    with open_clip(data) as container:
        np.testing.assert_array_equal(read_frames(container, [1, 5]), _all_frames(path)[[1, 5]])


def test_clips_that_cannot_be_read_are_one_line_errors(tmp_path):
    good = open(make_clip(tmp_path / "clip.mp4", 20, 64, 48, 10), "rb").read()
    front = make_clip(tmp_path / "front.mp4", 20, 64, 48, 10, options={"movflags": "faststart"})  # index first
    front = open(front, "rb").read()
    audio = tmp_path / "audio.m4a"
    with av.open(str(audio), "w") as out:
        stream = out.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    cases = {"empty": b"", "not a video": b"GIF89a" + bytes(100), "cut short": good[: len(good) // 3],
             "cut short, index first": front[: len(front) // 2],  # opens, declares 20 frames, holds fewer
             "audio only": audio.read_bytes()}
    for name, data in cases.items():
        with pytest.raises(VideoError) as caught:
            with open_clip(io.BytesIO(data)) as container:
                info = clip_info(container)
                read_frames(container, range(info.frames))
        message = str(caught.value)
        assert message and "\n" not in message and "Errno" not in message, (name, message)


def test_an_mp4_cut_short_is_said_to_be_cut_short_wherever_it_was_cut(tmp_path):
    """An MP4 is a chain of boxes, each opening with its size: one cut short has a last box running
    past its end, said so, whether its index (moov) comes last or first; a whole one reads whole."""
    index_last = open(make_clip(tmp_path / "clip.mp4", 20, 64, 48, 10), "rb").read()
    index_first = open(make_clip(tmp_path / "front.mp4", 20, 64, 48, 10, options={"movflags": "faststart"}), "rb").read()
    for whole in (index_last, index_first):
        with open_clip(io.BytesIO(whole)) as container:
            assert clip_info(container).frames == 20
        for share in (0.3, 0.6, 0.95):
            cut = whole[: int(len(whole) * share)]
            with pytest.raises(VideoError, match=rf"^the file is cut short: its '(moov|mdat)' box runs [\d,]+ bytes? past "
                                                 rf"the end of the file \({len(cut):,} bytes\)$"):
                with open_clip(io.BytesIO(cut)) as container:
                    read_frames(container, range(clip_info(container).frames))
    # Cut exactly where its index (written last) begins: no 'moov' at all (a recording stopped).
    without_index = index_last[: index_last.index(b"moov") - 4]
    with pytest.raises(VideoError, match=r"^the file is cut short: it has no 'moov' box, the index an MP4 needs"):
        with open_clip(io.BytesIO(without_index)) as container:
            clip_info(container)
    # Bytes after the last box (a camera's trailer) and a last box sized "to the end of the file" (0)
    # are whole clips, not damage: FFmpeg reads them.
    for trailer in (b"KTRA" + bytes(60), b"\x00\x00\x00\x10junk" + bytes(8), b"abc",
                    b"\x00\x00\x10\x00free" + bytes(8), b"\x00\x00\x10\x00mdat" + bytes(8)):  # (as boxes, cut)
        with open_clip(io.BytesIO(index_last + trailer)) as container:
            assert read_frames(container, range(clip_info(container).frames)).shape[0] == 20
    to_the_end = index_first[:index_first.index(b"mdat") - 4] + bytes(4) + index_first[index_first.index(b"mdat"):]
    with open_clip(io.BytesIO(to_the_end)) as container:
        assert clip_info(container).frames == 20


@pytest.mark.parametrize("suffix,codec", [(".webm", "libvpx"), (".mkv", "mpeg4")])
def test_a_clip_without_a_frame_count_cut_short_is_refused_not_stored_as_a_slower_clip(tmp_path, suffix, codec):
    """WebM and Matroska declare no frame count; their length, in the header, survives a cut: a
    clip cut in half must not read as the whole length at half the frame rate."""
    whole = open(make_clip(tmp_path / f"clip{suffix}", 50, 64, 48, 10, codec=codec), "rb").read()
    with open_clip(io.BytesIO(whole)) as container:
        info = clip_info(container)
    assert info.frames == 50 and info.fps == pytest.approx(10, rel=0.02)
    for share in (0.5, 0.7, 0.9):
        with pytest.raises(VideoError, match=r"the file stops at \d+\.\d s of the 5\.0 s its container declares "
                                             r"\(it is cut short\)"):
            with open_clip(io.BytesIO(whole[: int(len(whole) * share)])) as container:
                clip_info(container)


def test_a_clip_whose_audio_runs_on_past_its_video_is_whole(tmp_path):
    """The container's length covers every stream: 1 s of video over 5 s of sound is neither cut short
    nor a slower clip (10 frames over the sound's 5 s)."""
    path = tmp_path / "talk.mkv"
    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        sound = out.add_stream("aac", rate=8000)
        _mux_all(out, video, [av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 20, np.uint8), format="rgb24")
                              for i in range(10)])
        sound_frames = []
        for i in range(40):  # 40 × 1,024 samples at 8 kHz: 5.1 s
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            samples.sample_rate, samples.pts = 8000, i * 1024
            sound_frames.append(samples)
        _mux_all(out, sound, sound_frames)
    with open(path, "rb") as handle, open_clip(handle) as container:
        info = clip_info(container)
        assert container.duration / 1e6 > 4.5  # the container's length is the sound's
    assert info.frames == 10 and info.fps == pytest.approx(10) and info.duration == pytest.approx(1.0)


def test_video_names():
    assert is_video_name("a/b/clip.MP4") and is_video_name("x.webm") and not is_video_name("photo.jpg")


def test_a_variable_rate_clip_without_a_frame_count_keeps_its_real_length(tmp_path):
    """Matroska declares no frame count and, for a variable-rate clip, the rate of its first frames:
    20 frames over 10.3 s must not become 20 frames at 30 fps (0.67 s)."""
    from fractions import Fraction

    path = tmp_path / "vfr.mkv"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        times = [i / 30 for i in range(10)] + [0.3 + i for i in range(1, 11)]  # 10 quick frames, then 1 a second
        frames = []
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 12, np.uint8), format="rgb24")
            frame.pts, frame.time_base = int(t * 1000), Fraction(1, 1000)
            frames.append(frame)
        _mux_all(out, stream, frames)
    with open(path, "rb") as handle, open_clip(handle) as container:
        info = clip_info(container)
    assert info.frames == 20 and 9.5 < info.duration < 11.5, info


def _mux_all(out, stream, frames) -> None:
    """Encode ``frames`` into ``stream`` of the open container ``out``, then flush the encoder."""
    for frame in [*frames, None]:
        for packet in stream.encode(frame):
            out.mux(packet)
