"""The Qwen-VL image processor, shared by Qwen2-VL, Qwen2.5-VL and Qwen3-VL, as either of
transformers' two backends does it: Qwen2VLImageProcessor (torchvision) or Qwen2VLImageProcessorPil
(Pillow). Smart resize to multiples of patch × merge, rescale and normalise, and patches flattened
in merge-block order; the backends differ in the resize kernel and in how the normalisation
rounds. The worker side decodes and resizes; patchify_torch finishes on the device. Each backend
is checked against its own transformers class in the tests."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vitcore.imaging.decode import decode_rgb


RESAMPLE_NAMES = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")  # Pillow's (and transformers') codes
# transformers picks its torchvision class whenever torchvision is installed, and vLLM always has it;
# a default that depended on what is installed here would make one command differ between machines.
DEFAULT_BACKEND = "torchvision"


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
        return f"{RESAMPLE_NAMES[self.resample]} ({'Pillow' if self.backend == 'pil' else 'torchvision'})"

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
    """An RGB Pillow image → (H, W, 3) uint8 at the processor's size, resampled as the backend does."""
    height, width = prep.target_size(img.height, img.width)
    return resize_pixels(img, (width, height), prep)


def resize_pixels(rgb, size: tuple[int, int], prep: QwenVLPreprocess) -> np.ndarray:
    """An RGB Pillow image → uint8 (H, W, 3) at ``size`` (width, height).

    pil: Pillow's resize (Qwen2VLImageProcessorPil). torchvision: what Qwen2VLImageProcessor's
    torchvision resize does on the CPU, done with torch's own kernel (torchvision itself is not
    needed): the picture as a (1, 3, H, W) uint8 tensor, interpolated with antialiasing in uint8
    (bicubic, lanczos; bilinear where torch has its vectorised uint8 kernel), else in float32, then
    rounded back to uint8."""
    if prep.backend == "pil":
        return np.array(rgb.resize(size, Image.Resampling(prep.resample)), dtype=np.uint8)
    pixels = np.array(rgb, dtype=np.uint8)  # (H, W, 3), writable (torch warns on Pillow's read-only view)
    width, height = size
    if (height, width) == pixels.shape[:2]:
        return pixels  # torchvision hands an image of the target size back untouched
    import torch.nn.functional as F

    mode = TORCH_MODES[prep.resample]
    x = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()[None]  # (1, 3, H, W), as transformers lays it out
    smooth = mode != "nearest-exact"  # antialiased, corners not aligned; nearest neither
    kwargs = dict(size=[height, width], mode=mode, antialias=smooth, align_corners=False if smooth else None)
    if mode != "bilinear" or _native_uint8_bilinear():
        y = F.interpolate(x, **kwargs)
    else:  # torchvision's path on CPUs without AVX2: through float32
        y = F.interpolate(x.float(), **kwargs).round_().to(torch.uint8)
    return np.ascontiguousarray(y[0].permute(1, 2, 0).numpy())


# Pillow's filter codes → torch's interpolation modes, as transformers maps them for torchvision
# (box and hamming have none: transformers' torchvision backend cannot use them either).
TORCH_MODES = {0: "nearest-exact", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def _native_uint8_bilinear() -> bool:
    """torchvision resizes uint8 bilinearly in uint8 only where torch vectorises that kernel."""
    import platform

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


@dataclass(frozen=True)
class QwenVLImageLoader:
    """Worker side: decode → upright RGB → the processor's size (the backend's resize) → uint8 (H, W, 3)."""

    prep: QwenVLPreprocess
    decode: str = "full"

    def load(self, source) -> tuple[np.ndarray, tuple[int, int]]:
        """An image (a binary file object or a path) → the processor's pixels and its original size."""
        target = lambda w, h: self.prep.target_size(h, w)[::-1]  # noqa: E731  (w, h) → (w', h')
        rgb, (width, height) = decode_rgb(source, self.decode, target)
        # The size comes from the original picture (a draft decode is smaller), as the processor's would.
        return resize_pixels(rgb, target(width, height), self.prep), (width, height)


def normalize(pixels: torch.Tensor, prep: QwenVLPreprocess) -> torch.Tensor:
    """uint8 (H, W, C) → float32, rescaled and normalised with each backend's own rounding."""
    mean = torch.tensor(prep.mean, dtype=torch.float32)
    std = torch.tensor(prep.std, dtype=torch.float32)
    if prep.backend == "pil":  # rescale in float64, then normalise in float32
        return ((pixels.double() * prep.rescale_factor).float() - mean.to(pixels.device)) / std.to(pixels.device)
    # torchvision: one step, with mean and std scaled by 1 / rescale_factor in float32
    scale = 1.0 / prep.rescale_factor
    return (pixels.float() - (mean * scale).to(pixels.device)) / (std * scale).to(pixels.device)


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
