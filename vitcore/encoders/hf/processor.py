"""The image processors of the transformers-defined towers (CLIPImageProcessor, SiglipImageProcessor,
BitImageProcessor for DINOv2, ViTImageProcessor, Siglip2ImageProcessor), from a checkpoint's own
settings, as either of transformers' backends applies them: resize (a fixed height × width, the
shortest edge to S, or SigLIP2's NaFlex size for at most N patches), centre crop, rescale and
normalise. Workers decode, resize and crop (uint8); the device normalises (and, for NaFlex,
cuts patches). Each backend is checked against its own transformers class in the tests."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from vitcore.encoders import pixels as shared
from vitcore.encoders.pixels import DEFAULT_BACKEND, interpolation_name
from vitcore.imaging.decode import decode_rgb

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD = (0.5, 0.5, 0.5)

# Each processor class's defaults (transformers 5), for the keys a checkpoint's JSON leaves out.
_SQUARE_224 = {"height": 224, "width": 224}
CLASS_DEFAULTS = {
    "CLIPImageProcessor": dict(size={"shortest_edge": 224}, crop_size=_SQUARE_224, do_center_crop=True, resample=3,
                               image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, default_to_square=False),
    "BitImageProcessor": dict(size={"shortest_edge": 224}, crop_size=_SQUARE_224, do_center_crop=True, resample=3,
                              image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, default_to_square=False),
    "SiglipImageProcessor": dict(size=_SQUARE_224, do_center_crop=False, resample=3, image_mean=IMAGENET_STANDARD,
                                 image_std=IMAGENET_STANDARD, default_to_square=False),
    "ViTImageProcessor": dict(size=_SQUARE_224, do_center_crop=False, resample=2, image_mean=IMAGENET_STANDARD,
                              image_std=IMAGENET_STANDARD, default_to_square=True),
    "Siglip2ImageProcessor": dict(resample=2, image_mean=IMAGENET_STANDARD, image_std=IMAGENET_STANDARD,
                                  patch_size=16, max_num_patches=256, do_center_crop=False),
}


@dataclass(frozen=True)
class HFPreprocess:
    """What a checkpoint's image processor does to a picture, resolved from its JSON and class defaults."""

    processor: str  # the transformers class, without a backend suffix
    resize_rule: str  # "fixed": to height × width; "shortest_edge": that side to ``shortest_edge``; "max_patches": NaFlex
    resample: int  # Pillow's filter code
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    height: int | None = None  # resize "fixed"
    width: int | None = None
    shortest_edge: int | None = None  # resize "shortest_edge"
    crop_height: int | None = None  # centre crop (None: none)
    crop_width: int | None = None
    patch_size: int | None = None  # resize "max_patches": NaFlex patches of p × p, at most max_num_patches
    max_num_patches: int | None = None
    backend: str = DEFAULT_BACKEND  # transformers' torchvision or pil class: whose resize and rounding

    @property
    def interpolation(self) -> str:
        return interpolation_name(self.resample, self.backend)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every processed picture, or None when it varies (NaFlex)."""
        if self.crop_height is not None:
            return self.crop_height, self.crop_width
        if self.resize_rule == "fixed":
            return self.height, self.width
        return None

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) a picture is resized to, before any crop."""
        if self.resize_rule == "fixed":
            return self.height, self.width
        if self.resize_rule == "shortest_edge":  # transformers' get_resize_output_image_size, default_to_square False
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        return max_patches_size(height, width, self.patch_size, self.max_num_patches)

    def to_record(self) -> dict:
        record = asdict(self)
        record.pop("resample")  # recorded by name: "bicubic (torchvision)", "bilinear (Pillow)"
        return {**record, "interpolation": self.interpolation}


def max_patches_size(height: int, width: int, patch: int, max_patches: int, eps: float = 1e-5) -> tuple[int, int]:
    """SigLIP2 NaFlex: the largest (height, width), multiples of ``patch``, each side scaled by one
    factor found by bisection (as Siglip2ImageProcessor searches it), with at most ``max_patches``."""
    def side(scale: float, size: int) -> int:
        return int(max(patch, math.ceil(size * scale / patch) * patch))

    low, high = eps / 10, 100.0
    while high - low >= eps:
        scale = (low + high) / 2
        if (side(scale, height) / patch) * (side(scale, width) / patch) <= max_patches:
            low = scale
        else:
            high = scale
    return side(low, height), side(low, width)


@dataclass(frozen=True)
class HFImageLoader:
    """Worker side: decode → upright RGB → the processor's resize and crop → uint8 (H, W, 3)."""

    prep: HFPreprocess
    decode: str = "full"

    def load(self, source) -> tuple[np.ndarray, tuple[int, int]]:
        """An image (a binary file object or a path) → the processor's pixels and its original size."""
        target = lambda w, h: self.prep.resized_size(h, w)[::-1]  # noqa: E731  (w, h) → (w', h')
        rgb, (width, height) = decode_rgb(source, self.decode, target)
        # The size comes from the original picture (a draft decode is smaller), as the processor's would.
        resized = shared.resize_pixels(rgb, target(width, height), self.prep.resample, self.prep.backend)
        if self.prep.crop_height is not None:
            resized = shared.center_crop(resized, self.prep.crop_height, self.prep.crop_width)
        return resized, (width, height)


def normalize(pixels, prep: HFPreprocess):
    """uint8 (…, H, W, 3) → float32 (…, 3, H, W), rescaled and normalised as the backend rounds."""
    x = shared.normalize(pixels, prep.mean, prep.std, prep.rescale_factor, prep.backend)
    return x.movedim(-1, -3)


def naflex_patches(pixels, prep: HFPreprocess):
    """uint8 (H, W, 3) → float32 patches (h·w, p·p·3), each patch's pixels row by row, channels last
    (Siglip2ImageProcessor's order), and the patch grid (h, w)."""
    p = prep.patch_size
    x = shared.normalize(pixels, prep.mean, prep.std, prep.rescale_factor, prep.backend)  # (H, W, 3)
    H, W, C = x.shape
    h, w = H // p, W // p
    x = x.reshape(h, p, w, p, C).permute(0, 2, 1, 3, 4)  # (h, w, p, p, C)
    return x.reshape(h * w, p * p * C), (h, w)
