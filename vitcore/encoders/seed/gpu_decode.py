"""--decode gpu: JPEGs decoded by nvJPEG on the GPU (torchvision.io.decode_jpeg) and resized there.

Data flow, for the seed encoders:

    worker:  JPEG file → its bytes, upright (width, height) and EXIF orientation from the header
             (no pixel decoding); other formats, JPEGs in CMYK/YCCK and JPEGs without an end
             marker (truncated) → decoded on the CPU as with --decode full
    collate: a batch's JPEG bytes → one buffer (EncodedJpegs)
    main:    → decode_jpeg on the device, up to MAX_DECODE_PIXELS per call → (3, H, W) uint8 each
             → exif_orient → resize_on_device (Pillow's bicubic as matrix products) → (S, S, 3)
             → merged with the CPU-decoded images in source order

A JPEG the GPU decoder refuses (corrupt, unusual) is decoded again on the CPU, so it ends as a
row or as a failure with Pillow's reason, as with the other decode modes. Where the GPU decoder is
not available (no CUDA, no torchvision), extract() decodes on the CPU (draft) and says so; the
file records the decode that was actually used.

The resize is Pillow's antialiased bicubic done as two matrix products (pillow_bicubic), so a
JPEG decoded on the GPU gets the pixels of --decode full to within a grey level, wherever the
JPEG decoders themselves agree (nvJPEG's IDCT and chroma upsampling are not libjpeg's).
"""

from __future__ import annotations

import dataclasses
import functools
import io

import torch
from PIL import Image

from vitcore.imaging.loader import Batch, Failure, describe_error
from vitcore.encoders.seed.processor import PAD_COLOR, PreprocessConfig, load_image, resize_plan


MAX_DECODE_PIXELS = 1 << 28  # pixels decoded per call (≈ 0.8 GB of RGB), so large photos fit


def decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes (1-D uint8 CPU tensors) → RGB (3, H, W) uint8 tensors on ``device``, as stored
    (torchvision applies EXIF orientation only when decoding on the CPU; exif_orient does it here)."""
    from torchvision.io import ImageReadMode, decode_jpeg  # torchvision: optional, only for --decode gpu

    return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


def exif_orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, H, W) as stored → upright, as Pillow's ImageOps.exif_transpose turns it."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip((-2, -1))
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, (-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip((-2, -1))
    if orientation == 8:
        return torch.rot90(image, 1, (-2, -1))
    return image


def unavailable_reason(device: torch.device) -> str | None:
    """Why JPEGs cannot be decoded on ``device`` (None: they can), from one tiny real decode."""
    if device.type != "cuda":
        return f"needs a CUDA device (this run uses {device})"

    probe = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(probe, format="JPEG")
    try:
        decode_jpegs([torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8)], device)
    except ImportError:
        return "needs torchvision (pip install torchvision)"
    except Exception as err:  # an old torchvision, a build without nvJPEG
        return f"is not available here ({describe_error(err)})"
    return None


def resize_on_device(image: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """Upright RGB (3, H, W) uint8 → (S, S, 3) uint8 by cfg.resize, on the tensor's device, with
    the geometry of preprocess.resize_plan and Pillow's arithmetic."""
    side = cfg.image_size
    _, height, width = image.shape
    plan = resize_plan(width, height, cfg)
    x = pillow_bicubic(image, plan.size, plan.box)  # (3, h, w)
    if cfg.resize == "pad":
        (left, top), (out_w, out_h) = plan.offset, plan.size
        canvas = torch.tensor(PAD_COLOR, dtype=torch.uint8, device=x.device).view(3, 1, 1).repeat(1, side, side)
        canvas[:, top:top + out_h, left:left + out_w] = x
        x = canvas
    return x.permute(1, 2, 0)  # (S, S, 3)


def pillow_bicubic(image: torch.Tensor, size: tuple[int, int], box: tuple[float, float, float, float]) -> torch.Tensor:
    """Pillow's antialiased bicubic resize of (3, H, W) uint8 as two matrix products on its device.

    As Pillow does it: a horizontal pass rounded to 8 bits, then a vertical one; each output pixel
    weighs the inputs within 2 × max(1, scale) of its centre by the a = -0.5 cubic, normalised.
    Pillow's 22-bit fixed-point weights are kept in float32 here, so a pixel can differ by one
    grey level where a sum lands next to .5.
    """
    out_w, out_h = size
    left, top, right, bottom = box
    wx = _bicubic_weights(image.shape[2], out_w, left, right, str(image.device))  # (out_w, W)
    wy = _bicubic_weights(image.shape[1], out_h, top, bottom, str(image.device))  # (out_h, H)
    x = image.float() @ wx.T  # (3, H, out_w)
    x = (x + 0.5).floor_().clamp_(0, 255)
    x = wy @ x  # (3, out_h, out_w)
    return (x + 0.5).floor_().clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=1024)
def _bicubic_weights(in_size: int, out_size: int, start: float, end: float, device: str) -> torch.Tensor:
    """(out_size, in_size) float32: row i holds the normalised weights of output pixel i."""
    scale = (end - start) / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    centre = start + (torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * scale  # (out,)
    first = (centre - support + 0.5).floor().clamp(min=0)  # Pillow's window: [first, last)
    last = (centre + support + 0.5).floor().clamp(max=in_size)
    x = torch.arange(in_size, dtype=torch.float64, device=device)  # (in,)
    t = ((x[None] - centre[:, None] + 0.5) / filter_scale).abs()  # (out, in)
    a = -0.5
    w = torch.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    torch.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, torch.zeros_like(t)))
    w = w * ((x[None] >= first[:, None]) & (x[None] < last[:, None]))
    total = w.sum(dim=1, keepdim=True)
    w = torch.where(total != 0, w / total, w)
    return w.to(device=device, dtype=torch.float32)


class GpuJpegDecoder:
    """Finishes a batch whose JPEGs the workers left encoded: decode + orient + resize on the device.

    ``refused`` counts the JPEGs the device decoder would not take (Pillow decoded them instead).
    """

    def __init__(self, cfg: PreprocessConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.refused = 0

    def __call__(self, batch: Batch, sources) -> Batch:
        jpegs = batch.jpegs
        if jpegs is None:
            return batch
        done: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}
        failures = list(batch.failures)
        for group in _groups_by_pixels(jpegs.sizes, MAX_DECODE_PIXELS):
            decoded = self._decode([jpegs.file(i) for i in group])
            for i, image in zip(group, decoded, strict=True):
                index, size = jpegs.indices[i], jpegs.sizes[i]
                if image is not None:
                    image = exif_orient(image, jpegs.orientations[i])
                if image is not None and tuple(image.shape) == (3, size[1], size[0]):
                    done[index] = (resize_on_device(image, self.cfg), size)
                    continue
                self.refused += 1
                try:  # refused on the device: Pillow decodes it, or says why it cannot
                    with sources[index].open() as handle:
                        pixels, size = load_image(handle, self.cfg)
                    done[index] = (torch.from_numpy(pixels.copy()).to(self.device), size)
                except Exception as err:
                    failures.append(Failure(index=index, error=describe_error(err)))
        cpu_pixels = batch.pixels.to(self.device, non_blocking=True) if len(batch.indices) else None
        for position, index in enumerate(batch.indices):
            done[index] = (cpu_pixels[position], batch.sizes[position])
        order = sorted(done)
        side = self.cfg.image_size
        pixels = (torch.stack([done[i][0] for i in order]) if order
                  else torch.empty((0, side, side, 3), dtype=torch.uint8, device=self.device))
        return dataclasses.replace(
            batch, indices=order, pixels=pixels, sizes=[done[i][1] for i in order],
            failures=sorted(failures, key=lambda f: f.index), jpegs=None,
        )

    def notes(self) -> list[str]:
        """What the run's summary says about this decoder."""
        return [f"JPEGs the GPU decoder refused, decoded by Pillow instead: {self.refused}"] if self.refused else []

    def _decode(self, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """One call for the group; if it fails (one bad file fails them all), one call per image."""
        try:
            return list(decode_jpegs(datas, self.device))
        except Exception:
            pass
        out: list[torch.Tensor | None] = []
        for data in datas:
            try:
                out.append(decode_jpegs([data], self.device)[0])
            except Exception:
                out.append(None)
        return out


def _groups_by_pixels(sizes: list[tuple[int, int]], budget: int) -> list[list[int]]:
    """Consecutive positions, in groups whose pictures hold at most ``budget`` pixels (at least one each)."""
    groups: list[list[int]] = [[]]
    total = 0
    for i, (width, height) in enumerate(sizes):
        if groups[-1] and total + width * height > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += width * height
    return groups
