"""The Qwen-VL video processors, as transformers' Qwen2VLVideoProcessor (Qwen2-VL and Qwen2.5-VL)
and Qwen3VLVideoProcessor do them: which frames are sampled, the size they are resized to, the
resize itself (torchvision's: transformers has no Pillow backend for video), the fused rescale and
normalisation, the last frame repeated up to a multiple of the temporal patch, and the patches in
merge-block order, temporal patch by temporal patch. Also the timing a language model is given:
Qwen2.5-VL's second_per_grid_ts, Qwen3-VL's per-patch timestamps.

    settings  video_settings(folder, family)   the checkpoint's video processor, over its class defaults
    worker    VideoPlan.frames(info)           frame indices to read; resize_frames(...) → uint8 (T, H', W', 3)
    device    patchify_video(frames, prep)     → float32 patches (t·h·w, 3·T·p·p) and the grid (t, h, w)


The sampling rule differs by family: Qwen2-VL's processor samples only when asked (do_sample_frames,
or an fps / num_frames), then truncates ``arange(0, total, total / n)``; Qwen3-VL's samples by
default at 2 fps, rounding ``linspace(0, total − 1, n)``. Torch-free but for the resize and patchify.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace

import numpy as np

from vitcore.encoders.checkpoint_files import nested_processor, processor_record, read_json
from vitcore.encoders.pixels import normalize, torchvision_resize
from vitcore.errors import UsageError, WeightsError

# transformers' class attributes (video_processing_qwen2_vl.py, video_processing_qwen3_vl.py, 5.x)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CLASS_DEFAULTS = {
    "qwen2": dict(min_pixels=128 * 28 * 28, max_pixels=28 * 28 * 768, patch_size=14, mean=CLIP_MEAN, std=CLIP_STD,
                  do_sample_frames=False, fps=None, max_video_tokens=128000),
    "qwen3": dict(min_pixels=128 * 32 * 32, max_pixels=32 * 32 * 768, patch_size=16, mean=(0.5,) * 3, std=(0.5,) * 3,
                  do_sample_frames=True, fps=2.0, max_video_tokens=768),
}
SHARED_DEFAULTS = dict(merge_size=2, temporal_patch_size=2, min_frames=4, max_frames=768, num_frames=None,
                       rescale_factor=1 / 255, resample=3, cap_pixels_per_frame=False)
UNSAMPLED_LIMIT = 768  # frames a clip may have when its processor takes every frame (Qwen2-VL's default)


@dataclass(frozen=True)
class VideoPreprocess:
    """What a checkpoint's video processor does; ``kind`` "qwen2" (Qwen2-VL, Qwen2.5-VL) or "qwen3"."""

    kind: str
    min_pixels: int
    max_pixels: int
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float
    resample: int
    do_sample_frames: bool
    fps: float | None
    num_frames: int | None
    min_frames: int
    max_frames: int
    cap_pixels_per_frame: bool
    max_video_tokens: int

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def to_record(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    def overridden(self, fps: float | None = None, max_frames: int | None = None) -> "VideoPreprocess":
        """--fps / --max-frames, as passing fps= / max_frames= to the processor does (an fps samples)."""
        prep = self
        if fps is not None:
            if not (0 < fps < math.inf):
                raise UsageError(f"--fps must be a number above 0, got {fps}")
            prep = replace(prep, fps=float(fps), num_frames=None, do_sample_frames=True)
        if max_frames is not None:
            if max_frames < prep.temporal_patch_size:
                raise UsageError(f"--max-frames must be at least {prep.temporal_patch_size}, got {max_frames}")
            if not prep.do_sample_frames or (prep.fps is None and prep.num_frames is None):
                raise UsageError("--max-frames bounds the frames a sampling processor takes, and this checkpoint's "
                                 "video processor takes every frame: give --fps too (e.g. --fps 2 --max-frames "
                                 f"{max_frames})")
            prep = replace(prep, max_frames=int(max_frames))
        return prep

    # -- which frames ---------------------------------------------------------------------
    def frames(self, total: int, fps: float) -> list[int]:
        """Indices of the frames the processor keeps of a clip of ``total`` frames at ``fps``."""
        if self.kind == "qwen3":
            return self._qwen3_frames(total, fps)
        return self._qwen2_frames(total, fps)

    def _qwen3_frames(self, total: int, fps: float) -> list[int]:
        if not self.do_sample_frames:
            return list(range(total))
        n = self.num_frames
        if n is None and self.fps is not None:
            n = int(total / fps * self.fps)
            n = min(max(n, self.min_frames), self.max_frames, total)
        if n is None:
            n = min(max(total, self.min_frames), self.max_frames)
        return [int(i) for i in np.linspace(0, total - 1, n).round().astype(int)]  # numpy: half to even

    def _qwen2_frames(self, total: int, fps: float) -> list[int]:
        import torch  # the processor's own float32 arange, truncated: the same indices to the last bit

        if not self.do_sample_frames or (self.num_frames is None and self.fps is None):
            if total > UNSAMPLED_LIMIT:
                raise ValueError(f"the clip has {total} frames and this checkpoint's video processor samples none "
                                 f"(every frame would be encoded): a file made with `vit-extract run --fps 2` samples 2 frames "
                                 "a second")
            return list(range(total))
        tps = self.temporal_patch_size
        if self.num_frames is not None:
            n = round(self.num_frames / tps) * tps
        else:
            top = math.floor(min(self.max_frames, total) / tps) * tps
            n = total / fps * self.fps
            n = math.floor(min(max(n, self.min_frames), top, total) / tps) * tps
        if n > total or n <= 0:
            raise ValueError(f"the clip has {total} frames, fewer than the {max(n, tps)} the video processor samples")
        indices = torch.arange(0, total, total / n).int().tolist()
        return [i for i in indices if i < total][:n]  # transformers can overrun by one (and then fails)

    # -- how large -------------------------------------------------------------------------
    def frame_size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        """(height, width) every sampled frame is resized to; ``frames`` sampled, before padding."""
        f, tps = self.factor, self.temporal_patch_size
        if self.kind == "qwen3":
            top = self.max_pixels
            if self.cap_pixels_per_frame:
                per_frame = max(min(self.max_video_tokens * f * f, self.max_pixels // frames), int(self.min_pixels * 1.05))
                top = per_frame * frames
            return qwen3_video_resize(frames, height, width, tps, f, self.min_pixels, top)
        from vitcore.encoders.qwen.processor import smart_resize

        top = self.max_pixels
        if self.cap_pixels_per_frame:
            total_pixels = int(self.max_video_tokens * f * f * 0.9)
            top = max(min(top, total_pixels * tps // frames), int(self.min_pixels * 1.05))
        return smart_resize(height, width, f, self.min_pixels, top)

    def grid(self, frames: int, fps: float, height: int, width: int) -> tuple[int, int, int]:
        """The patch grid (t, h, w) of a clip of ``frames`` frames at ``fps``, (height, width) pixels,
        from its header alone (what a dry run counts): the frames kept, padded up to a whole temporal
        patch, at their resized size."""
        kept = len(self.frames(frames, fps))
        h, w = self.frame_size(kept, height, width)
        return math.ceil(kept / self.temporal_patch_size), h // self.patch_size, w // self.patch_size

    # -- the timing a language model is given ------------------------------------------------
    def timing(self, indices: list[int], total: int, fps: float) -> dict:
        """second_per_grid_t (Qwen2.5-VL: temporal patch ÷ the sampled rate) and the seconds of each
        temporal patch (Qwen3-VL's prompt: the mean of its first and last frame's time)."""
        tps = self.temporal_patch_size
        sampled_fps = len(indices) / total * fps
        padded = list(indices) + [indices[-1]] * (-len(indices) % tps)
        times = [i / fps for i in padded]
        stamps = [(times[j] + times[j + tps - 1]) / 2 for j in range(0, len(times), tps)]
        return {"frames": list(indices), "second_per_grid_t": tps / sampled_fps, "timestamps": stamps}


def qwen3_video_resize(frames: int, height: int, width: int, temporal_factor: int, factor: int,
                       min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's video smart resize: the pixel budget counts the (rounded) frames too."""
    if frames < temporal_factor:
        raise ValueError(f"the clip gives {frames} frame(s); Qwen3-VL's video processor needs at least {temporal_factor}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    from vitcore.encoders.qwen.processor import smart_resize

    return smart_resize(height, width, factor, min_pixels, max_pixels, frames, temporal_factor)


VIDEO_CLASSES = {"Qwen2VLVideoProcessor": "qwen2", "Qwen3VLVideoProcessor": "qwen3"}


def video_settings(folder: str, kind: str) -> VideoPreprocess:
    """The checkpoint's video processor as transformers' AutoVideoProcessor resolves it: the settings
    from processor_config.json's nested video_processor, else video_preprocessor_config.json, else
    preprocessor_config.json (the image processor's, whose min/max pixels it then takes); the class
    from their video_processor_type, else from the image processor's type (Qwen2VLImageProcessor →
    Qwen2VLVideoProcessor, even in a Qwen3-VL checkpoint without a video processor file of its own),
    else from the model type (``kind``); over that class's defaults."""
    record, where = _video_record(folder)
    kind = _video_class(record, kind, where)
    values = {**SHARED_DEFAULTS, **CLASS_DEFAULTS[kind]}
    size = record.get("size")
    if isinstance(size, dict):
        values["min_pixels"] = size.get("shortest_edge", values["min_pixels"])
        values["max_pixels"] = size.get("longest_edge", values["max_pixels"])
    for top in ("min_pixels", "max_pixels"):
        if record.get(top) is not None:  # the older top-level keys win over size
            values[top] = record[top]
    for name, key in (("mean", "image_mean"), ("std", "image_std")):
        if record.get(key) is not None:
            values[name] = tuple(float(v) for v in record[key])
    for name in ("patch_size", "merge_size", "temporal_patch_size", "rescale_factor", "resample", "do_sample_frames",
                 "fps", "num_frames", "min_frames", "max_frames", "cap_pixels_per_frame", "max_video_tokens"):
        if name in record and record[name] is not None:
            values[name] = record[name]
    if values["fps"] is not None and values["num_frames"] is not None and values["do_sample_frames"]:
        raise WeightsError(f"{where} sets both fps and num_frames, which transformers refuses together")
    if not values["min_pixels"] or not values["max_pixels"]:
        raise WeightsError(f"{where}: the video resize needs size.shortest_edge and size.longest_edge")
    values["fps"] = None if values["fps"] is None else float(values["fps"])
    values["cap_pixels_per_frame"] = bool(values["cap_pixels_per_frame"])
    return VideoPreprocess(kind=kind, **values)


def _video_class(record: dict, kind: str, where: str) -> str:
    name = record.get("video_processor_type")
    if name is None and isinstance(record.get("image_processor_type"), str):
        inferred = record["image_processor_type"].replace("ImageProcessor", "VideoProcessor")
        name = inferred if inferred in VIDEO_CLASSES else None  # (a …Fast name has no video twin: the model type)
    if name is None:
        return kind
    if name not in VIDEO_CLASSES:
        raise WeightsError(f"{where} names video processor {name}, not {' or '.join(VIDEO_CLASSES)}")
    return VIDEO_CLASSES[name]


def _video_record(folder: str) -> tuple[dict, str]:
    found = nested_processor(folder, "video_processor")
    if found is not None:
        return found
    path = os.path.join(folder, "video_preprocessor_config.json")
    if os.path.isfile(path):
        return read_json(path), path
    return processor_record(folder)  # the image processor's file: its min/max pixels become the video's


def resize_frames(frames: np.ndarray, size: tuple[int, int], prep: VideoPreprocess) -> np.ndarray:
    """uint8 (T, H, W, 3) → (T, height, width, 3) for ``size`` (height, width), as the video
    processor's torchvision resize does (its only backend)."""
    return torchvision_resize(frames, size[::-1], prep.resample)


def patchify_video(frames, prep: VideoPreprocess):
    """On the device: uint8 (T, H, W, 3) → float32 patches (t·h·w, 3·T·p·p) in the processor's order
    (temporal patch, then merge blocks) and the grid (t, h, w); the last frame repeated up to a
    multiple of the temporal patch, after the normalisation, as the processor pads."""
    import torch

    p, m, tps = prep.patch_size, prep.merge_size, prep.temporal_patch_size
    x = normalize(frames, prep.mean, prep.std, prep.rescale_factor, "torchvision").permute(0, 3, 1, 2)  # (T, C, H, W)
    if pad := -x.shape[0] % tps:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    T, C, H, W = x.shape
    t, h, w = T // tps, H // p, W // p
    x = x.reshape(t, tps, C, h // m, m, p, w // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, C * tps * p * p), (t, h, w)


def load_clip(source, prep: VideoPreprocess) -> tuple[np.ndarray, tuple[int, int], dict]:
    """Worker side: a clip (binary file object) → its sampled frames resized, uint8 (T, H', W', 3); its
    original (width, height); and what the file records of it (frames, rate, duration, timing)."""
    from vitcore.imaging.video import clip_info, open_clip, read_frames

    with open_clip(source) as container:
        info = clip_info(container)
        indices = prep.frames(info.frames, info.fps)
        size = prep.frame_size(len(indices), info.height, info.width)  # known before decoding: frames
        frames = read_frames(container, indices, each=lambda frame: resize_frames(frame[None], size, prep)[0])
    record = {**info.to_record(), **prep.timing(indices, info.frames, info.fps)}
    return frames, (info.width, info.height), record
