"""What transformers' two image-processor backends do to pixels, for every family whose preprocessing
is a transformers image processor (the Qwen-VL towers, SigLIP, CLIP, DINOv2): the resize (Pillow's
for the Pillow classes, torch's antialiased kernel for the torchvision classes), the centre crop,
and the rescale + normalise with each backend's own rounding. The worker side (resize, crop) works
on uint8 pictures; normalise runs on the device. Torchvision itself is never needed: its resize on
the CPU is torch's interpolate, called here directly."""

from __future__ import annotations

import platform

import numpy as np
from PIL import Image

RESAMPLE_NAMES = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")  # Pillow's (and transformers') codes
# transformers picks its torchvision class whenever torchvision is installed, and vLLM always has it;
# a default that depended on what is installed here would make one command differ between machines.
DEFAULT_BACKEND = "torchvision"
# Pillow's filter codes → torch's interpolation modes, as transformers maps them for torchvision
# (box and hamming have none: transformers' torchvision backend cannot use them either).
TORCH_MODES = {0: "nearest-exact", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def interpolation_name(resample: int, backend: str) -> str:
    """The resize filter as a file records it: "bicubic (torchvision)", "bilinear (Pillow)"."""
    return f"{RESAMPLE_NAMES[resample]} ({'Pillow' if backend == 'pil' else 'torchvision'})"


def resize_pixels(rgb, size: tuple[int, int], resample: int, backend: str) -> np.ndarray:
    """An RGB Pillow image → uint8 (H, W, 3) at ``size`` (width, height).

    pil: Pillow's resize (the *ImageProcessorPil classes). torchvision: what the torchvision
    classes' resize does on the CPU, done with torch's own kernel: the picture as a (1, 3, H, W)
    uint8 tensor, interpolated with antialiasing in uint8 (bicubic, lanczos; bilinear where torch
    has its vectorised uint8 kernel), else in float32, then rounded back to uint8."""
    if backend == "pil":
        return np.array(rgb.resize(size, Image.Resampling(resample)), dtype=np.uint8)
    pixels = np.array(rgb, dtype=np.uint8)  # (H, W, 3), writable (torch warns on Pillow's read-only view)
    return torchvision_resize(pixels[None], size, resample)[0]


def torchvision_resize(frames: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """uint8 (N, H, W, 3) → (N, height, width, 3) at ``size`` (width, height), as transformers'
    torchvision classes resize a (N, 3, H, W) uint8 tensor on the CPU (each of the N alike)."""
    width, height = size
    if (height, width) == frames.shape[1:3]:
        return frames  # torchvision hands pictures of the target size back untouched
    import torch  # torch: the registry imports this module's callers, torch-free until a run
    import torch.nn.functional as F

    mode = TORCH_MODES[resample]
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W), as transformers lays it out
    smooth = mode != "nearest-exact"  # antialiased, corners not aligned; nearest neither
    kwargs = dict(size=[height, width], mode=mode, antialias=smooth, align_corners=False if smooth else None)
    if mode != "bilinear" or _native_uint8_bilinear():
        y = F.interpolate(x, **kwargs)
    else:  # torchvision's path on CPUs without AVX2: through float32
        y = F.interpolate(x.float(), **kwargs).round_().to(torch.uint8)
    return np.ascontiguousarray(y.permute(0, 2, 3, 1).numpy())


def _native_uint8_bilinear() -> bool:
    """torchvision resizes uint8 bilinearly in uint8 only where torch vectorises that kernel."""
    import torch

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3) → (height, width, 3): the centred window, top-left rounded down, as both
    backends crop; a picture smaller than the window is padded with black first (left/top get the
    smaller half), as both backends pad."""
    h, w = pixels.shape[:2]
    if height > h or width > w:
        top, left = max(0, (height - h) // 2), max(0, (width - w) // 2)
        padded = np.zeros((max(h, height), max(w, width), pixels.shape[2]), np.uint8)
        padded[top:top + h, left:left + w] = pixels
        pixels, (h, w) = padded, padded.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[top:top + height, left:left + width]


def normalize(pixels, mean, std, rescale_factor: float, backend: str):
    """uint8 (…, C) tensor → float32 (…, C), rescaled and normalised with each backend's own rounding."""
    import torch

    mean = torch.tensor(mean, dtype=torch.float32, device=pixels.device)
    std = torch.tensor(std, dtype=torch.float32, device=pixels.device)
    if backend == "pil":  # rescale in float64, then normalise in float32
        return ((pixels.double() * rescale_factor).float() - mean) / std
    # torchvision: one step, with mean and std scaled by 1 / rescale_factor in float32
    scale = 1.0 / rescale_factor
    return (pixels.float() - mean * scale) / (std * scale)
