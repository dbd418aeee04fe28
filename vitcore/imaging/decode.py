"""Decoding, for every encoder: an image's bytes → the upright RGB picture and its original upright
(width, height). Runs in the decoding workers, from a binary file object (never a path to reopen).

Every rule here (EXIF orientation, transparency over white, high bit depths, the draft decode of
large JPEGs) is recorded in the output file by the encoder's preprocessing record.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features


BACKGROUND = (255, 255, 255)  # transparent pixels are composited over white
DRAFT_MARGIN = 2  # draft decode keeps at least 2× the resized size, so the bicubic still antialiases
EXIF_ORIENTATION = 0x0112
JPEG_CODED = ("JPEG", "MPO")  # formats Pillow decodes with libjpeg, so draft() can scale them (MPO: phone cameras)


@dataclass
class JpegFile:
    """A worker's item for --decode gpu: a JPEG's bytes and what its header says."""

    data: np.ndarray  # 1-D uint8, the whole file
    size: tuple[int, int]  # upright (width, height)
    orientation: int  # EXIF orientation (1 = upright), applied after decoding


def decode_rgb(path, decode: str, wanted) -> tuple[Image.Image, tuple[int, int]]:
    """Read one image (a path or a binary file object) → the upright RGB picture and its original
    upright (width, height).

    ``wanted(width, height)`` is the size the picture will be resized to; with ``decode="draft"``
    a JPEG is decoded at the smallest DCT scale that keeps DRAFT_MARGIN × that size.
    """
    with _pillow_checks(), open_picture(path) as img:
        if img.format == "TIFF":
            upright = _oriented_tiff(path)
            if upright is not None:
                return upright
        img.seek(0)  # first frame of animations and multi-page files
        width, height, orientation = _upright_size(img)
        if decode == "draft" and img.format in JPEG_CODED:
            want_w, want_h = wanted(width, height)
            if orientation in (5, 6, 7, 8):
                want_w, want_h = want_h, want_w
            img.draft(None, (want_w * DRAFT_MARGIN, want_h * DRAFT_MARGIN))
        img.load()
        sixteen_bit = declared_16_bit(img)  # from the file, before a transpose drops its format
        upright = ImageOps.exif_transpose(img)
        rgb = to_rgb(upright, sixteen_bit)
    return rgb, (width, height)


TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}  # EXIF orientation → the turn that makes the picture upright


def _oriented_tiff(source) -> tuple[Image.Image, tuple[int, int]] | None:
    """A TIFF whose first IFD has an orientation other than 1: decoded as stored and turned here.

    Pillow's handling of TIFF orientation changed across versions (from 11 it turns some TIFFs
    itself at open, reports their size upright, and scrambles uncompressed greyscale ones), so the
    tag is set to 1 in a copy of the bytes and the turn applied here, the same on every version.
    None: no orientation to apply (decoded as usual)."""
    if hasattr(source, "read"):
        source.seek(0)
        data = source.read()
    else:
        with open(source, "rb") as handle:
            data = handle.read()
    orientation, stored = _tiff_orientation_to_1(data)
    if orientation not in TRANSPOSE:
        return None
    with _pillow_checks(), Image.open(io.BytesIO(stored)) as img:
        img.seek(0)
        img.load()
        upright = img.transpose(TRANSPOSE[orientation])
        rgb = to_rgb(upright, declared_16_bit(img))
    return rgb, upright.size


def _tiff_orientation_to_1(data: bytes) -> tuple[int, bytes]:
    """(the first IFD's orientation, the bytes with it set to 1); (1, data) when there is none."""
    if data[:4] not in (b"II*\0", b"MM\0*"):
        return 1, data
    order = "<" if data[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack_from(order + "I", data, 4)
        (count,) = struct.unpack_from(order + "H", data, ifd)
        for i in range(count):
            entry = ifd + 2 + 12 * i
            tag, kind = struct.unpack_from(order + "HH", data, entry)
            if tag == EXIF_ORIENTATION and kind == 3:  # SHORT, stored in the entry itself
                (orientation,) = struct.unpack_from(order + "H", data, entry + 8)
                patched = bytearray(data)
                struct.pack_into(order + "H", patched, entry + 8, 1)
                return orientation, bytes(patched)
    except struct.error:
        pass  # a damaged header: Pillow says what is wrong with it
    return 1, data


def declared_16_bit(img: Image.Image) -> bool:
    """Whether the file says its samples are 16-bit: the range comes from what the file declares,
    never from the values a picture happens to hold (a dark 16-bit picture is not 8-bit)."""
    if img.mode.startswith("I;16"):
        return True
    if img.mode != "I":
        return False
    if img.format in ("PPM", "PNG"):  # 16-bit PNG; PGM/PPM/PAM with maxval > 255, scaled by Pillow to 0..65535
        return True
    if img.format == "TIFF":
        bits = img.tag_v2.get(258)  # BitsPerSample
        return (bits[0] if isinstance(bits, tuple) else bits) == 16
    return False


def read_jpeg(source) -> tuple[np.ndarray, tuple[int, int], int] | None:
    """--decode gpu, in a worker: a JPEG the GPU decoder takes → (its bytes as 1-D uint8, upright
    (width, height), EXIF orientation) from the header alone; None for anything else (it is
    decoded on the CPU)."""
    with _pillow_checks(), open_picture(source) as img:
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):  # CMYK / YCCK: Pillow converts them
            return None
        width, height, orientation = _upright_size(img)
    if hasattr(source, "read"):
        source.seek(0)
        data = np.frombuffer(source.read(), dtype=np.uint8)
    else:
        data = np.fromfile(source, dtype=np.uint8)
    if not _has_end_marker(data):  # truncated: Pillow says so, a GPU decoder may fill in grey
        return None
    return data, (width, height), orientation


def _has_end_marker(data: np.ndarray, tail: int = 4096) -> bool:
    """Whether a JPEG's end-of-image marker (FF D9) is in its last ``tail`` bytes (some cameras
    append a little data after it)."""
    end = data[-tail:]
    return bool(np.any((end[:-1] == 0xFF) & (end[1:] == 0xD9)))


HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
AVIF_BRANDS = {b"avif", b"avis"}


def open_picture(source) -> Image.Image:
    """Image.open, with what Pillow's "cannot identify image file" leaves unsaid: an empty file, or
    a HEIF/HEIC or AVIF picture that this Pillow has no plugin for."""
    try:
        return Image.open(source)
    except UnidentifiedImageError:
        reason = _unidentified(source)
        if reason is None:
            raise
        raise UnidentifiedImageError(reason) from None


def _unidentified(source) -> str | None:
    if hasattr(source, "read"):
        source.seek(0)
        head = source.read(32)
    else:
        with open(source, "rb") as handle:
            head = handle.read(32)
    if not head:
        return "the file is empty (0 bytes)"
    if head[4:8] != b"ftyp":
        return None
    brands = {head[i:i + 4] for i in range(8, len(head) - 3, 4)}  # the major brand, then the compatible ones
    if brands & AVIF_BRANDS:  # before HEIF: an AVIF names mif1 too
        if features.check("avif"):
            return "an AVIF picture that Pillow could not read (damaged, or a kind of AVIF its decoder lacks)"
        return "an AVIF picture, which this Pillow cannot open (Pillow 11.2 or newer reads AVIF): upgrade Pillow or convert it"
    if brands & HEIF_BRANDS:
        return ("a HEIF/HEIC picture, which Pillow cannot open without a plugin: convert it to JPEG or PNG "
                "(pillow-heif reads it)")
    return None


@contextlib.contextmanager
def pixel_limit(limit: int | None):
    """Pillow's decompression-bomb limit for the pictures opened inside (--max-image-pixels): None
    keeps the one Pillow has (PIL.Image.MAX_IMAGE_PIXELS, 89,478,485 unless changed), 0 lifts it.
    Over the limit is an error inside, as in a run's decoding (Pillow itself only warns up to twice
    the limit). Pillow reads the limit from its module when a file is opened, so it is set for the
    whole process while inside (a worker decodes one picture at a time; a Python caller's other
    threads would see it too) and put back after."""
    kept = Image.MAX_IMAGE_PIXELS
    if limit is not None:
        Image.MAX_IMAGE_PIXELS = limit or None
    try:
        with _pillow_checks():
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = kept


def is_over_pixel_limit(err: BaseException) -> bool:
    return isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning))


def over_pixel_limit(err: BaseException, limit: int | None, command: str = "run") -> str:
    """A picture over the pixel limit, in words: its pixels and the limit that applied (``limit``, or
    Pillow's own for None), and the option of ``command`` that raises it. Pillow's text names twice the
    limit past it (its error, not its warning)."""
    limit = Image.MAX_IMAGE_PIXELS if limit is None else limit
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return f"DecompressionBombError: {size}, over the limit of {limit:,} (`vit-extract {command} --max-image-pixels N` " \
           "raises it, 0 lifts it)"


@contextlib.contextmanager
def _pillow_checks():
    with warnings.catch_warnings():
        # Pillow's other warnings (odd EXIF or TIFF tags) would only clutter the user's terminal
        # from the worker processes; over MAX_IMAGE_PIXELS is a failure (decompression bombs).
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _upright_size(img: Image.Image) -> tuple[int, int, int]:
    """(width, height) of the picture once its EXIF orientation is applied, and the orientation."""
    width, height = img.size
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    if orientation in (5, 6, 7, 8):  # rotated by 90°: the upright picture is h × w
        width, height = height, width
    return width, height, orientation


def to_rgb(img: Image.Image, sixteen_bit: bool | None = None) -> Image.Image:
    """Any Pillow mode → RGB. Alpha is composited over BACKGROUND; high bit depths are scaled to 8
    bits (``sixteen_bit``: the file declared 16-bit samples; None: tell from the picture)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(img)
        sixteen = declared_16_bit(img) if sixteen_bit is None else sixteen_bit
        rgb = np.repeat(_to_uint8(values, mode, sixteen)[..., None], 3, axis=2)
        transparent = img.info.get("transparency")
        if isinstance(transparent, int) and not isinstance(transparent, bool):  # tRNS: one grey level
            rgb[values == transparent] = BACKGROUND
        return Image.fromarray(rgb)
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        mode == "P" and "transparency" in img.info
    ) or (mode in ("L", "RGB") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")  # 1, L, P, CMYK (incl. YCCK JPEGs), YCbCr, LAB, HSV


def _to_uint8(values: np.ndarray, mode: str, sixteen_bit: bool = False) -> np.ndarray:
    """High-bit-depth greyscale → uint8.

    Declared 16-bit samples (I;16*, 16-bit PNG, PGM/PPM, TIFF): the full 16-bit range (÷257).
    Other I (32-bit int) and F (float): kept as is when the values already lie in 0..255, ÷257
    when in 0..65535, F in 0..1 times 255; anything else is stretched from its own min..max.
    """
    values = values.astype(np.float64)
    if mode.startswith("I;16") or sixteen_bit:
        scaled = values / 257.0
    else:
        finite = np.isfinite(values)
        if not finite.all():
            # NaN / inf pixels ("no data") must not decide the scale: NaN and -inf become the
            # smallest finite value, +inf the largest.
            kept = values[finite]
            floor, ceiling = (float(kept.min()), float(kept.max())) if kept.size else (0.0, 0.0)
            values = np.nan_to_num(values, nan=floor, posinf=ceiling, neginf=floor)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if mode == "F" and low >= 0.0 and high <= 1.0:
            scaled = values * 255.0
        elif low >= 0.0 and high <= 255.0:
            scaled = values
        elif low >= 0.0 and high <= 65535.0:
            scaled = values / 257.0
        else:
            scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
