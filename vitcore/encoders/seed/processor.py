"""The seed encoders' preprocessing: decode (imaging/decode.py) → resize to S × S by the --resize mode
→ uint8 (S, S, 3) in the workers; normalisation on the device.

Everything done to an image is recorded in the output file (``PreprocessConfig.to_json``), so a
file always says how its pixels were made.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from vitcore.imaging import HIGH_BIT_DEPTH
from vitcore.imaging.decode import BACKGROUND, DRAFT_MARGIN, JpegFile, decode_rgb, read_jpeg

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_COLOR = (124, 116, 104)  # letterbox fill: the ImageNet mean, which normalises to ≈ 0


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 224  # output side in pixels (square)
    resize: str = "squash"  # squash: straight to S×S; crop: shorter side to S, centre crop; pad: letterbox
    decode: str = "draft"  # draft: JPEG decoded at a reduced scale when much larger than needed; full; gpu
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_json(self) -> str:
        record = asdict(self)
        record.update(
            interpolation="bicubic (Pillow, antialiased; on the GPU for JPEGs decoded there)"
            if self.decode == "gpu" else "bicubic (Pillow, antialiased)",
            background=list(BACKGROUND),
            pad_color=list(PAD_COLOR),
            draft_margin=DRAFT_MARGIN,
            exif_orientation="applied",
            high_bit_depth=HIGH_BIT_DEPTH,
        )
        return json.dumps(record, sort_keys=True)


def resized_size(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """Size the whole picture is scaled to before any crop or padding."""
    side = cfg.image_size
    if cfg.resize == "squash":
        return side, side
    if cfg.resize == "crop":
        scale = side / min(width, height)
    else:  # pad
        scale = side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass(frozen=True)
class ResizePlan:
    """How a resize mode maps a picture onto the S × S input, for every resizer (Pillow here,
    gpu_decode on the device) so the geometry is decided in one place."""

    box: tuple[float, float, float, float]  # (left, top, right, bottom): the source region resampled
    size: tuple[int, int]  # (width, height) it is resampled to
    offset: tuple[int, int]  # (left, top) where that lands on the S × S canvas (pad)


def resize_plan(width: int, height: int, cfg: PreprocessConfig) -> ResizePlan:
    """squash: the whole picture to S × S; crop: the centred square of the shorter side (at a
    fractional offset when needed) to S × S; pad: the whole picture scaled to fit, centred."""
    side = cfg.image_size
    whole = (0.0, 0.0, float(width), float(height))
    if cfg.resize == "squash":
        return ResizePlan(whole, (side, side), (0, 0))
    if cfg.resize == "crop":
        short = min(width, height)
        left, top = (width - short) / 2, (height - short) / 2
        return ResizePlan((left, top, left + short, top + short), (side, side), (0, 0))
    if cfg.resize == "pad":
        inner_w, inner_h = resized_size(width, height, cfg)
        return ResizePlan(whole, (inner_w, inner_h), ((side - inner_w) // 2, (side - inner_h) // 2))
    raise ValueError(f"unknown resize mode {cfg.resize!r}")


@dataclass(frozen=True)
class ImageLoader:
    """The seed encoders' worker side: an input's bytes → (S, S, 3) uint8 and the original upright
    (width, height). With decode="gpu" a JPEG the GPU decoder takes is passed on still encoded."""

    cfg: PreprocessConfig

    @property
    def decode(self) -> str:
        return self.cfg.decode

    def load(self, source) -> tuple[np.ndarray | JpegFile, tuple[int, int]]:
        if self.cfg.decode == "gpu":
            encoded = read_jpeg(source)
            if encoded is not None:
                return JpegFile(*encoded), encoded[1]  # decoded on the device (gpu_decode)
            source.seek(0)
        return load_image(source, self.cfg)


def load_image(path, cfg: PreprocessConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """Read one image (a path or a binary file object) → (S, S, 3) uint8 pixels and the original
    upright (width, height).

    Raises on anything that is not a readable image; the loader turns that into a failure record.
    """
    rgb, size = decode_rgb(path, cfg.decode, lambda w, h: resized_size(w, h, cfg))
    return resize(rgb, cfg), size


def resize(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """RGB picture → (S, S, 3) uint8 by the configured resize mode (antialiased bicubic)."""
    plan = resize_plan(*img.size, cfg)
    out = img.resize(plan.size, Image.Resampling.BICUBIC, box=plan.box)
    if cfg.resize == "pad":
        canvas = Image.new("RGB", (cfg.image_size, cfg.image_size), PAD_COLOR)
        canvas.paste(out, plan.offset)
        out = canvas
    return np.asarray(out, dtype=np.uint8)  # (S, S, 3)


def framed(picture: Image.Image, resize: str) -> Image.Image:
    """A whole picture framed as a resize mode shows it, at its own scale (for `show` and `similar`):
    crop: the centre square; pad: letterboxed with PAD_COLOR; squash: as it is."""
    width, height = picture.size
    if resize == "crop":
        short = min(width, height)
        left, top = (width - short) // 2, (height - short) // 2
        return picture.crop((left, top, left + short, top + short))
    if resize == "pad":
        side = max(width, height)
        canvas = Image.new("RGB", (side, side), PAD_COLOR)
        canvas.paste(picture, ((side - width) // 2, (side - height) // 2))
        return canvas
    return picture


def normalize_on_device(pixels, mean, std, dtype):
    """uint8 (B, H, W, 3) on the device → normalised (B, 3, H, W) in ``dtype``; the arithmetic runs in float32."""
    import torch  # torch: only on the device side (the workers and readers of this module need none)

    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    x = pixels.permute(0, 3, 1, 2).to(torch.float32)  # (B, 3, H, W)
    return ((x / 255.0 - mean_t) / std_t).to(dtype)
