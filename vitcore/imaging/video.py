"""Video clips, read with PyAV (its wheel bundles FFmpeg; the [video] extra): what a clip holds and
its frames at chosen indices, as transformers' PyAV video loader reads them, so that the frames
both sides sample are the same pictures.

    clip_info(container)          → ClipInfo: frames, average rate, size and duration (frames / fps)
    read_frames(container, idx)   → uint8 (T, H, W, 3): frame idx[k] is the idx[k]-th frame decoded
                                    from the start; decoding stops after the last one wanted, and
                                    only the wanted frames are kept (a long clip costs time, not memory)

The container's own frame count is used, as transformers does; a container that declares none
(WebM and Matroska often do not) has its frames counted by decoding once, in constant memory.
Rotation metadata is not applied (transformers does not either). Torch-free: this runs in the
decoding workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi", "m4v")
EXTRA = "pip install 'vit-extract[video]'"


class VideoError(ValueError):
    """A clip that cannot be read as one (no video stream, no frames, broken data): a failure record."""


def is_video_name(name) -> bool:
    """Whether a file or member name has a video extension."""
    return os.path.splitext(str(name))[1].lower().lstrip(".") in VIDEO_EXTENSIONS


@dataclass(frozen=True)
class ClipInfo:
    frames: int  # frames in the clip (the container's count, or counted by decoding)
    fps: float  # the stream's average frame rate
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.frames / self.fps

    def to_record(self) -> dict:
        return {"frames": self.frames, "fps": self.fps, "width": self.width, "height": self.height,
                "duration": round(self.duration, 6)}


def open_clip(source):
    """A binary file object → an open PyAV container (close it, or use it in a with-block)."""
    from vitcore.imaging.sniff import HEAD_BYTES, content_kind  # (sniff names clips by this module's rule)

    av = _av()
    if hasattr(source, "read") and hasattr(source, "seek"):
        head = source.read(HEAD_BYTES)
        if not head:  # said as a picture's is, not as FFmpeg's "Invalid argument" (or a seek error)
            raise VideoError("the file is empty (0 bytes)")
        kind = content_kind(head)
        if (kind or ("",))[0] == "picture":  # FFmpeg reads a JPEG as a one-frame clip
            raise VideoError("a still picture, not a clip")  # (the record adds what it is: rename it)
        if kind == ("video", "MP4"):
            cut = _box_past_the_end(source)
            if cut is not None:
                raise VideoError(cut)
        source.seek(0)
    try:
        return av.open(source, mode="r")
    except (av.FFmpegError, OSError) as err:  # (an empty file is an OSError from the file object)
        raise VideoError(f"not a readable video ({_reason(err)})") from None


_TOP_LEVEL_BOXES = {"ftyp", "moov", "mdat", "free", "skip", "wide", "uuid", "moof", "mfra", "meta", "pdin", "styp",
                    "sidx", "ssix", "emsg", "prft", "udta", "pnot"}
_MOST_BOXES = 256  # walked at most (a fragmented MP4 has thousands): past that, not told


def _box_past_the_end(handle) -> str | None:
    """An MP4/MOV file (ISO base media: a chain of boxes, each opening with its size) cut short, said
    so (FFmpeg says "Invalid data found" or fails mid-clip): its index (moov) or its only media data
    (mdat) runs past the end of the file, or it has no index at all (a recording stopped before
    writing it). None: whole, or not told: a box of a name no MP4 has at its top level (bytes a
    camera or a tool left after the last box), a box "to the end of the file", too many boxes."""
    seen: set[str] = set()
    try:
        end = handle.seek(0, 2)
        place = 0
        for _ in range(_MOST_BOXES):
            if place + 8 > end:
                break
            handle.seek(place)
            head = handle.read(16)
            size, name = int.from_bytes(head[:4], "big"), head[4:8].decode("latin-1")
            if name not in _TOP_LEVEL_BOXES:
                break
            if size == 1 and len(head) == 16:  # a 64-bit size follows the name
                size = int.from_bytes(head[8:16], "big")
            if size < 8:  # 0: the box runs to the end of the file; less: not a box
                return None
            if place + size > end:
                if name == "moov" or (name == "mdat" and "mdat" not in seen):  # (another one: bytes left after)
                    past = place + size - end
                    return (f"the file is cut short: its '{name}' box runs {past:,} byte{'s' * (past != 1)} past the "
                            f"end of the file ({end:,} bytes)")
                return None
            seen.add(name)
            place += size
        else:
            return None  # too many boxes to walk: not told
    except (OSError, ValueError):
        return None
    if "mdat" in seen and not seen & {"moov", "moof"}:
        return ("the file is cut short: it has no 'moov' box, the index an MP4 needs (a recording stopped before "
                "writing it)")
    return None


def clip_info(container) -> ClipInfo:
    if not container.streams.video:
        raise VideoError("the file holds no video stream (audio only?)")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise VideoError("the video stream declares no frame rate")
    fps = float(rate)
    frames = stream.frames
    if not frames:  # WebM, Matroska: counted, and their rate taken from the frames' own times
        frames, first, last, reached = _scan(container)
        seconds = _duration(container, stream)
        if frames > 0 and seconds > 0 and reached is not None and seconds - reached > 0.01 * seconds + 1 / fps:
            # A file cut short keeps the length its header declares (written first): all its streams
            # stop early. (A whole file's last packet ends at that length, within a frame.)
            raise VideoError(f"the file stops at {reached:.1f} s of the {seconds:.1f} s its container declares "
                             "(it is cut short)")
        if frames > 1 and first is not None and last is not None and last > first:
            # Their declared rate is often the first frames' only, wrong for a variable-rate clip (10 s
            # recorded as 0.7 s); the container's length is no measure either (its sound may run on).
            timed = (frames - 1) / (last - first)
            if abs(timed - fps) > 0.02 * fps:  # (a constant rate: the declared one kept exact)
                fps = timed
    if frames <= 0:
        raise VideoError("the video stream holds no frames")
    return ClipInfo(frames=int(frames), fps=fps, width=stream.codec_context.width,
                    height=stream.codec_context.height)


def read_frames(container, indices, each=None) -> np.ndarray:
    """The frames at ``indices`` (ascending, repeats allowed) → uint8 (T, H, W, 3) RGB; ``each``
    (uint8 (H, W, 3) → uint8 (h, w, 3)) applied to every frame as it is decoded, so that only the
    frames wanted, at their final size, are ever held (a 720p clip: 4.6 GB before, as decoded)."""
    av = _av()
    wanted = sorted(set(int(i) for i in indices))
    found: dict[int, np.ndarray] = {}
    size, decoded = None, 0
    try:
        container.seek(0)
        for i, frame in enumerate(container.decode(video=0)):
            decoded = i + 1
            if i > wanted[-1]:
                break
            if i in wanted:
                size = size or (frame.width, frame.height)
                if (frame.width, frame.height) != size:
                    raise VideoError(f"the frame size changes within the clip ({size[0]}×{size[1]} to "
                                     f"{frame.width}×{frame.height} at frame {i})")
                picture = frame.to_ndarray(format="rgb24")
                found[i] = each(picture) if each is not None else picture
    except av.FFmpegError as err:
        raise VideoError(f"the video stops decoding after frame {decoded} ({_reason(err)}; is the file cut short or "
                         "damaged?)") from None
    missing = [i for i in wanted if i not in found]
    if missing:
        raise VideoError(f"the video ends before frame {missing[0]} (it declares more frames than it holds)")
    return np.stack([found[int(i)] for i in indices])


def _duration(container, stream) -> float:
    """The clip's length in seconds as the container declares it (stream, else container), or 0."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / 1_000_000 if container.duration else 0.0  # (AV_TIME_BASE)


def _scan(container) -> tuple[int, float | None, float | None, float | None]:
    """One pass over the file: (the frames the clip holds, decoded one by one; the first and the last
    one's time; where its last packet over every stream ends), times in seconds from its start."""
    av = _av()
    start = container.start_time / 1_000_000 if container.start_time else 0.0  # (AV_TIME_BASE)
    count, first, last, end = 0, None, None, None
    video = container.streams.video[0]
    try:
        container.seek(0)
        for packet in container.demux():
            if packet.pts is not None and packet.time_base is not None:  # (not a stream's flush packet)
                at = float((packet.pts + (packet.duration or 0)) * packet.time_base) - start
                end = at if end is None else max(end, at)
            if packet.stream is not video:
                continue
            for frame in packet.decode():
                count += 1
                if frame.time is not None:
                    first = frame.time if first is None else first
                    last = frame.time
    except av.FFmpegError as err:
        raise VideoError(f"the video cannot be decoded ({_reason(err)}; is the file cut short or damaged?)") from None
    return count, first, last, end


def _reason(err) -> str:
    """FFmpeg's own words ("Invalid data found when processing input"), without its error number."""
    return " ".join(str(getattr(err, "strerror", None) or err).split())[:160]


def _av():
    try:
        import av
    except ImportError:
        raise VideoError(f"reading video needs PyAV, which is not installed: {EXTRA}") from None
    return av
