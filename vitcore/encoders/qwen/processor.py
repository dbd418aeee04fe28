"""The Qwen-VL image processor (Qwen2VLImageProcessor, Pillow backend), shared by Qwen2-VL, Qwen2.5-VL
and Qwen3-VL: smart resize to multiples of patch × merge, rescale and normalise, and patches
flattened in merge-block order. The worker side decodes and resizes; patchify_torch finishes on
the device. Checked against transformers' own processor in the tests."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vitcore.imaging.decode import decode_rgb


RESAMPLE_NAMES = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")  # Pillow's (and transformers') codes


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

    @property
    def interpolation(self) -> str:
        """The resize filter, as the file records it."""
        return f"{RESAMPLE_NAMES[self.resample]} (Pillow)"

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_settings(cls, settings: dict) -> "QwenVLPreprocess":
        """From checkpoint.image_processor_settings (what transformers resolves for a folder)."""
        return cls(**{name: settings[name] for name in ("min_pixels", "max_pixels", "patch_size", "merge_size",
                                                         "temporal_patch_size", "rescale_factor", "resample")},
                   mean=tuple(settings["image_mean"]), std=tuple(settings["image_std"]))

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing: the processor's smart resize, or the fixed side."""
        if self.fixed is not None:
            return self.fixed, self.fixed
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Nearest sides that are multiples of ``factor``, with the area kept within [min, max] pixels."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h_bar = round(height / factor) * factor  # Python's round: half to even, as the processor does
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_rgb(img, prep: QwenVLPreprocess) -> np.ndarray:
    """An RGB Pillow image → (H, W, 3) uint8 at the processor's size (Pillow bicubic)."""
    height, width = prep.target_size(img.height, img.width)
    return np.asarray(img.resize((width, height), Image.Resampling(prep.resample)), dtype=np.uint8)


def patchify(pixels: np.ndarray, prep: QwenVLPreprocess) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(H, W, 3) uint8 → normalised float32 patches (h·w, 3·T·p·p) in merge-block order, and (1, h, w)."""
    p, m, t = prep.patch_size, prep.merge_size, prep.temporal_patch_size
    x = (pixels.astype(np.float64) * prep.rescale_factor).astype(np.float32)  # (H, W, C)
    x = (x - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    H, W, C = x.shape
    h, w = H // p, W // p
    x = x.transpose(2, 0, 1).reshape(C, h // m, m, p, w // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (h/m, w/m, m, m, C, p, p): merge-block order
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # a still image: T equal frames
    return np.ascontiguousarray(x.reshape(h * w, C * t * p * p)), (1, h, w)


@dataclass(frozen=True)
class QwenVLImageLoader:
    """Worker side: decode → upright RGB → the processor's size (Pillow bicubic) → uint8 (H, W, 3)."""

    prep: QwenVLPreprocess
    decode: str = "full"

    def load(self, source) -> tuple[np.ndarray, tuple[int, int]]:
        """An image (a binary file object or a path) → the processor's pixels and its original size."""
        target = lambda w, h: self.prep.target_size(h, w)[::-1]  # noqa: E731  (w, h) → (w', h')
        rgb, (width, height) = decode_rgb(source, self.decode, target)
        # The size comes from the original picture (a draft decode is smaller), as the processor's would.
        new_w, new_h = target(width, height)
        return np.array(rgb.resize((new_w, new_h), Image.Resampling(self.prep.resample)), dtype=np.uint8), (width, height)


def patchify_torch(pixels: torch.Tensor, prep: QwenVLPreprocess) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """patchify() on the device: uint8 (H, W, 3) → float32 (h·w, 3·T·p·p) in merge-block order."""
    p, m, t = prep.patch_size, prep.merge_size, prep.temporal_patch_size
    mean = torch.tensor(prep.mean, dtype=torch.float32, device=pixels.device)
    std = torch.tensor(prep.std, dtype=torch.float32, device=pixels.device)
    x = ((pixels.double() * prep.rescale_factor).float() - mean) / std  # (H, W, C), as the processor rounds
    H, W, C = x.shape
    h, w = H // p, W // p
    x = x.permute(2, 0, 1).reshape(C, h // m, m, p, w // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    x = x[:, :, :, :, :, None].expand(*x.shape[:5], t, p, p)  # (h/m, w/m, m, m, C, T, p, p)
    return x.reshape(h * w, C * t * p * p), (1, h, w)
