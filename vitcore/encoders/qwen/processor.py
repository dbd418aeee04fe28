"""The Qwen-VL image processor, shared by Qwen2-VL, Qwen2.5-VL and Qwen3-VL, as either of
transformers' two backends does it: Qwen2VLImageProcessor (torchvision) or Qwen2VLImageProcessorPil
(Pillow). Smart resize to multiples of patch × merge, rescale and normalise, and patches flattened
in merge-block order; the backends differ in the resize kernel and in how the normalisation
rounds. The worker side decodes and resizes; patchify_torch finishes on the device. Each backend
is checked against its own transformers class in the tests."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np

from vitcore.encoders import pixels as shared
from vitcore.encoders.pixels import DEFAULT_BACKEND, interpolation_name
from vitcore.imaging.decode import decode_rgb
from vitcore.encoders.qwen.video import load_clip
from vitcore.imaging.video import is_video_name

if TYPE_CHECKING:  # the settings and the workers' side need no torch (a run's settings are checked before it)
    import torch

    from vitcore.encoders.qwen.video import VideoPreprocess




@dataclass(frozen=True)
class QwenVLPreprocess:
    """What a checkpoint's image processor does (Qwen2VLImageProcessor; the defaults are Qwen3-VL's values)."""

    min_pixels: int = 65536
    max_pixels: int = 16777216
    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    fixed: int | None = None  # --resolution N: every image to N × N (a multiple of 32)
    resample: int = 3  # Pillow's filter: 3 bicubic (the processor's default), 2 bilinear, …
    backend: str = DEFAULT_BACKEND  # whose resize and rounding: transformers' torchvision or pil class

    @property
    def interpolation(self) -> str:
        """The resize filter, as the file records it."""
        return interpolation_name(self.resample, self.backend)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_settings(cls, settings: dict, backend: str = DEFAULT_BACKEND) -> "QwenVLPreprocess":
        """From checkpoint.image_processor_settings (what transformers resolves for a folder)."""
        return cls(**{name: settings[name] for name in ("min_pixels", "max_pixels", "patch_size", "merge_size",
                                                         "temporal_patch_size", "rescale_factor", "resample")},
                   mean=tuple(settings["image_mean"]), std=tuple(settings["image_std"]), backend=backend)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing: the processor's smart resize, or the fixed side."""
        if self.fixed is not None:
            return self.fixed, self.fixed
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int, frames: int = 1,
                 temporal_factor: int = 1) -> tuple[int, int]:
    """Nearest sides that are multiples of ``factor``, with the area kept within [min, max] pixels.
    Qwen3-VL's video resize counts the clip's ``frames`` in the area: rounded to ``temporal_factor``
    to test the bounds, as they are in the scale (a picture: one frame)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h_bar = round(height / factor) * factor  # Python's round: half to even, as the processor does
    w_bar = round(width / factor) * factor
    t_bar = round(frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_rgb(img, prep: QwenVLPreprocess) -> np.ndarray:
    """An RGB Pillow image → (H, W, 3) uint8 at the processor's size, resampled as the backend does."""
    height, width = prep.target_size(img.height, img.width)
    return resize_pixels(img, (width, height), prep)


def resize_pixels(rgb, size: tuple[int, int], prep: QwenVLPreprocess) -> np.ndarray:
    """An RGB Pillow image → uint8 (H, W, 3) at ``size`` (width, height), as the backend resizes."""
    return shared.resize_pixels(rgb, size, prep.resample, prep.backend)


@dataclass(frozen=True)
class QwenVLImageLoader:
    """Worker side: decode → upright RGB → the processor's size (the backend's resize) → uint8 (H, W, 3)."""

    prep: QwenVLPreprocess
    decode: str = "full"
    video: "VideoPreprocess | None" = None  # clips among the inputs: their video processor (video.py)

    def load(self, source):
        """An image (a binary file object or a path) → the processor's pixels and its original size;
        with clips among the inputs, also the "video" text of each (a clip's frames and timing, JSON)."""
        if self.video is not None:
            if is_video_name(getattr(source, "name", "")):
                frames, size, record = load_clip(source, self.video)
                return frames, size, {"video": json.dumps(record)}
            return (*self._picture(source), {"video": ""})
        return self._picture(source)

    def _picture(self, source) -> tuple[np.ndarray, tuple[int, int]]:
        target = lambda w, h: self.prep.target_size(h, w)[::-1]  # noqa: E731  (w, h) → (w', h')
        rgb, (width, height) = decode_rgb(source, self.decode, target)
        # The size comes from the original picture (a draft decode is smaller), as the processor's would.
        return resize_pixels(rgb, target(width, height), self.prep), (width, height)


def normalize(pixels: torch.Tensor, prep: QwenVLPreprocess) -> torch.Tensor:
    """uint8 (H, W, C) → float32, rescaled and normalised with each backend's own rounding."""
    return shared.normalize(pixels, prep.mean, prep.std, prep.rescale_factor, prep.backend)


def patchify_torch(pixels: torch.Tensor, prep: QwenVLPreprocess) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """On the device: uint8 (H, W, 3) → float32 patches (h·w, 3·T·p·p) in the processor's merge-block
    order (a still image: T equal frames), and its grid (1, h, w)."""
    p, m, t = prep.patch_size, prep.merge_size, prep.temporal_patch_size
    x = normalize(pixels, prep)  # (H, W, C) float32
    H, W, C = x.shape
    h, w = H // p, W // p
    x = x.permute(2, 0, 1).reshape(C, h // m, m, p, w // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    x = x[:, :, :, :, :, None].expand(*x.shape[:5], t, p, p)  # (h/m, w/m, m, m, C, T, p, p)
    return x.reshape(h * w, C * t * p * p), (1, h, w)
