"""Tests for decoding (vitcore.imaging.decode) and the seed preprocessing (vitcore.encoders.seed.processor): decode → upright RGB → resize → uint8, and device normalisation."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from vitcore.imaging.loader import ImageDataset
from vitcore.encoders.seed.processor import (
    PAD_COLOR,
    ImageLoader,
    PreprocessConfig,
    load_image,
    normalize_on_device,
    resized_size,
)
from vitcore.imaging.decode import BACKGROUND, DRAFT_MARGIN, decode_rgb, to_rgb
from vitcore.inputs.files import Source

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
SIDE = 16  # band images are SIDE×SIDE so a squash to SIDE keeps every pixel exact


# --------------------------------------------------------------------------- helpers


def cfg(size: int = SIDE, **kw) -> PreprocessConfig:
    return PreprocessConfig(image_size=size, **kw)


def save(img: Image.Image, path: Path, **kw) -> str:
    img.save(path, **kw)
    return str(path)


def load(path: str, size: int = SIDE, **kw) -> tuple[np.ndarray, tuple[int, int]]:
    """load_image, checking the contract every output must meet: (S, S, 3) uint8."""
    pixels, orig = load_image(path, cfg(size, **kw))
    assert isinstance(pixels, np.ndarray)
    assert pixels.shape == (size, size, 3)
    assert pixels.dtype == np.uint8
    return pixels, orig


def bands(values, dtype, channels: int | None = None) -> np.ndarray:
    """A SIDE×SIDE array made of len(values) vertical bands, band i filled with values[i]."""
    shape = (SIDE, SIDE) if channels is None else (SIDE, SIDE, channels)
    arr = np.zeros(shape, dtype=dtype)
    width = SIDE // len(values)
    for i, v in enumerate(values):
        arr[:, i * width : (i + 1) * width] = v
    return arr


def band_cols(n: int, i: int) -> slice:
    width = SIDE // n
    return slice(i * width, (i + 1) * width)


def assert_bands(pixels: np.ndarray, expected_rgb, tol: int = 0) -> None:
    """Each vertical band of the output has (within tol) the expected RGB colour."""
    for i, want in enumerate(expected_rgb):
        region = pixels[:, band_cols(len(expected_rgb), i)].astype(int)
        diff = np.abs(region - np.array(want, dtype=int))
        assert diff.max() <= tol, f"band {i}: got {region[0, 0].tolist()}, want {list(want)}"


def over_background(rgb, alpha: int) -> tuple[int, ...]:
    """Independent alpha compositing over BACKGROUND."""
    a = alpha / 255.0
    return tuple(round(c * a + b * (1 - a)) for c, b in zip(rgb, BACKGROUND))


def region_mean(pixels: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    return pixels[rows, cols].reshape(-1, 3).mean(axis=0)


def assert_colour(pixels: np.ndarray, rows: slice, cols: slice, want, tol: float) -> None:
    got = region_mean(pixels, rows, cols)
    assert np.abs(got - np.array(want)).max() <= tol, f"mean {got.round(1).tolist()} != {list(want)}"


def gradient(width: int, height: int) -> Image.Image:
    """A smooth RGB picture (JPEG-friendly, so draft and full decodes should agree)."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    arr = np.stack([x, y, np.full_like(x, 128)], axis=-1)
    return Image.fromarray(arr.round().astype(np.uint8))


def blocks(width: int, height: int, grid) -> Image.Image:
    """An RGB picture split into a len(grid) × len(grid[0]) grid of solid colours."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    rows, cols = len(grid), len(grid[0])
    for r in range(rows):
        for c in range(cols):
            arr[r * height // rows : (r + 1) * height // rows, c * width // cols : (c + 1) * width // cols] = grid[r][c]
    return Image.fromarray(arr)


def assert_draft_scale(before, after, want, rotated: bool = False) -> None:
    """The draft decode kept ≥ DRAFT_MARGIN × the resized size (want, upright) in both directions and
    reduced as far as that allows (Pillow reduces by 1, 2, 4 or 8)."""
    factor = before[0] // after[0]
    assert factor in (1, 2, 4, 8) and after == tuple(-(-b // factor) for b in before)
    upright = after[::-1] if rotated else after
    need = (DRAFT_MARGIN * want[0], DRAFT_MARGIN * want[1])
    assert upright[0] >= need[0] and upright[1] >= need[1]
    if factor < 8:  # one more halving would have gone below the margin
        assert upright[0] // 2 < need[0] or upright[1] // 2 < need[1]


@pytest.fixture
def draft_spy(monkeypatch):
    """Records (size before, size after) of every JpegImageFile.draft call."""
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        before = self.size
        result = original(self, mode, size)
        calls.append((before, self.size, size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return calls


# --------------------------------------------------------------------------- modes → RGB


def test_mode_1_converts_to_black_and_white(tmp_path):
    """Bilevel "1" pixels become (0,0,0) and (255,255,255)."""
    img = Image.fromarray(bands([False, True], bool))
    assert img.mode == "1"
    pixels, size = load(save(img, tmp_path / "bilevel.png"))
    assert size == (SIDE, SIDE)
    assert_bands(pixels, [(0, 0, 0), (255, 255, 255)])


def test_mode_L_replicates_grey_into_three_channels(tmp_path):
    """Greyscale value v becomes (v, v, v)."""
    values = [0, 77, 200, 255]
    img = Image.fromarray(bands(values, np.uint8))
    assert img.mode == "L"
    pixels, _ = load(save(img, tmp_path / "grey.png"))
    assert_bands(pixels, [(v, v, v) for v in values])


def test_mode_LA_composites_alpha_over_background(tmp_path):
    """LA: alpha 0 → BACKGROUND, alpha 255 → the grey value, alpha 128 → a blend."""
    values = [(60, 0), (60, 255), (60, 128), (200, 255)]
    img = Image.frombytes("LA", (SIDE, SIDE), bands(values, np.uint8, 2).tobytes())
    pixels, _ = load(save(img, tmp_path / "la.png"))
    expected = [over_background((v, v, v), a) for v, a in values]
    assert expected[0] == BACKGROUND
    assert_bands(pixels, expected, tol=1)


def palette_image(indices, palette) -> Image.Image:
    img = Image.frombytes("P", (SIDE, SIDE), bands(indices, np.uint8).tobytes())
    img.putpalette([c for colour in palette for c in colour])
    return img


def test_mode_P_maps_palette_indices_to_colours(tmp_path):
    """A palette image shows each index's palette colour."""
    palette = [RED, GREEN, BLUE, YELLOW]
    pixels, _ = load(save(palette_image([0, 1, 2, 3], palette), tmp_path / "pal.png"))
    assert_bands(pixels, palette)


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_mode_P_with_transparency_index(tmp_path, fmt):
    """The transparent palette index becomes BACKGROUND; the other indices keep their colour."""
    palette = [RED, GREEN, BLUE, YELLOW]
    path = save(palette_image([0, 1, 2, 3], palette), tmp_path / f"pal_t.{fmt}", transparency=2)
    with Image.open(path) as check:
        assert check.mode == "P" and check.info.get("transparency") == 2
    pixels, _ = load(path)
    assert_bands(pixels, [RED, GREEN, BACKGROUND, YELLOW])


def test_mode_RGBA_composites_alpha_over_background(tmp_path):
    """RGBA: transparent → BACKGROUND (even if its colour is red), opaque keeps its colour, half → blend."""
    values = [(*RED, 0), (*GREEN, 255), (*BLUE, 128), (10, 20, 30, 64)]
    img = Image.frombytes("RGBA", (SIDE, SIDE), bands(values, np.uint8, 4).tobytes())
    pixels, _ = load(save(img, tmp_path / "rgba.png"))
    expected = [over_background(v[:3], v[3]) for v in values]
    assert expected[0] == BACKGROUND and expected[1] == GREEN
    assert_bands(pixels, expected, tol=1)


def test_mode_L_with_transparency_value(tmp_path):
    """A greyscale PNG with a tRNS grey value: that value → BACKGROUND, others unchanged."""
    img = Image.fromarray(bands([10, 90], np.uint8))
    pixels, _ = load(save(img, tmp_path / "l_trns.png", transparency=10))
    assert_bands(pixels, [BACKGROUND, (90, 90, 90)])


def test_mode_RGB_with_transparency_colour(tmp_path):
    """An RGB PNG with a tRNS colour key: pixels of that colour are transparent → BACKGROUND.

    to_rgb lists ``mode in ("L", "RGB") and "transparency" in img.info`` as alpha, so this is intended.
    """
    img = Image.fromarray(bands([RED, GREEN], np.uint8, 3))
    path = save(img, tmp_path / "rgb_trns.png", transparency=RED)
    with Image.open(path) as check:
        assert check.mode == "RGB" and tuple(check.info["transparency"]) == RED
    pixels, _ = load(path)
    assert_bands(pixels, [BACKGROUND, GREEN])


CMYK_INKS = [  # (C, M, Y, K) → the RGB any CMYK→RGB formula must give for pure inks
    ((0, 0, 0, 0), (255, 255, 255)),
    ((255, 0, 0, 0), (0, 255, 255)),
    ((0, 255, 255, 0), (255, 0, 0)),
    ((0, 0, 0, 255), (0, 0, 0)),
]


@pytest.mark.parametrize("fmt, tol", [("tiff", 0), ("jpeg", 12)])
def test_mode_CMYK_pure_inks(tmp_path, fmt, tol):
    """CMYK pure inks convert to their RGB complements (TIFF exact; JPEG incl. Adobe inversion, lossy)."""
    inks = [cmyk for cmyk, _ in CMYK_INKS]
    img = Image.frombytes("CMYK", (SIDE, SIDE), bands(inks, np.uint8, 4).tobytes())
    path = save(img, tmp_path / f"cmyk.{fmt}", **({"quality": 100} if fmt == "jpeg" else {}))
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    for decode in ("full", "draft"):
        pixels, _ = load(path, decode=decode)
        # JPEG smears across band edges: compare band interiors only.
        for i, (_, want) in enumerate(CMYK_INKS):
            cols = band_cols(len(CMYK_INKS), i)
            inner = slice(cols.start + 1, cols.stop - 1)
            assert_colour(pixels, slice(None), inner, want, tol)


def test_mode_I16_png_scaled_by_257(tmp_path):
    """16-bit PNG (I;16): 65535 → 255, 32896 → 128, 0 → 0, 12850 → 50 (÷257)."""
    values = [0, 12850, 32896, 65535]
    img = Image.frombytes("I;16", (SIDE, SIDE), bands(values, "<u2").tobytes())
    path = save(img, tmp_path / "deep.png")
    with Image.open(path) as check:
        assert check.mode.startswith("I;16")
    pixels, _ = load(path)
    assert_bands(pixels, [(round(v / 257),) * 3 for v in values])


def test_mode_I16_small_values_still_divided(tmp_path):
    """16-bit data is 16-bit even when every value is small: 255 → 1, not 255."""
    img = Image.frombytes("I;16", (SIDE, SIDE), bands([0, 255], "<u2").tobytes())
    pixels, _ = load(save(img, tmp_path / "dark16.png"))
    assert_bands(pixels, [(0, 0, 0), (1, 1, 1)])


def test_mode_I16_big_endian_in_memory():
    """to_rgb on an in-memory I;16B image reads the bytes big-endian (65535 → 255, 257 → 1)."""
    img = Image.frombytes("I;16B", (SIDE, SIDE), bands([257, 65535], ">u2").tobytes())
    out = np.asarray(to_rgb(img))
    assert out.shape == (SIDE, SIDE, 3)
    assert_bands(out, [(1, 1, 1), (255, 255, 255)])


@pytest.mark.parametrize(
    "mode, dtype, values, expected",
    [
        ("I", np.int32, [10, 100, 200, 17], [10, 100, 200, 17]),  # already 8-bit: kept (not stretched)
        ("I", np.int32, [300, 257 * 50, 257 * 100, 257 * 200], [1, 50, 100, 200]),  # 16-bit range: ÷257
        ("I", np.int32, [-1000, 0, 1000, 500], [0, 128, 255, 191]),  # anything else: stretched min..max
        ("F", np.float32, [0.0, 0.25, 0.5, 1.0], [0, 64, 128, 255]),  # 0..1: ×255
        ("F", np.float32, [0.0, 3.0, 100.0, 250.0], [0, 3, 100, 250]),  # 0..255: kept
    ],
)
def test_mode_I_and_F_tiff_map_to_8_bits_by_value_range(tmp_path, mode, dtype, values, expected):
    """32-bit integer (I) and float (F) TIFFs map to 8 bits by their value range."""
    img = Image.frombytes(mode, (SIDE, SIDE), bands(values, dtype).tobytes())
    path = save(img, tmp_path / "wide.tif")
    with Image.open(path) as check:
        assert check.mode == mode
    pixels, _ = load(path)
    assert_bands(pixels, [(v, v, v) for v in expected], tol=1)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_mode_F_non_finite_pixel_does_not_blank_image(tmp_path, bad):
    """One NaN/inf pixel (e.g. "no data") in a 0..1 float TIFF must not change how the others convert."""
    arr = bands([0.0, 0.25, 0.5, 1.0], np.float32)
    arr[0, 0] = bad
    path = save(Image.frombytes("F", (SIDE, SIDE), arr.tobytes()), tmp_path / "nan.tif")
    pixels, _ = load(path)
    finite = np.ones((SIDE, SIDE), dtype=bool)
    finite[0, 0] = False
    want = np.rint(np.where(finite, arr, 0) * 255).astype(int)
    for c in range(3):
        assert np.abs(pixels[..., c].astype(int) - want)[finite].max() <= 1


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr", "LAB", "HSV"])
def test_to_rgb_always_returns_rgb(mode):
    """to_rgb gives an RGB image of the same size for every mode."""
    img = Image.new(mode, (7, 5))
    out = to_rgb(img)
    assert out.mode == "RGB"
    assert out.size == (7, 5)


def test_sample_alpha_cutout_composited_over_white():
    """Real RGBA sample: alpha 0 pixels → BACKGROUND, alpha 255 pixels keep their RGB."""
    with Image.open(SAMPLES / "alpha_cutout.png") as img:
        rgba = np.asarray(img.convert("RGBA"))
        out = np.asarray(to_rgb(img))
    clear, opaque = rgba[..., 3] == 0, rgba[..., 3] == 255
    assert clear.any() and opaque.any()
    assert (out[clear] == np.array(BACKGROUND, dtype=np.uint8)).all()
    assert (out[opaque] == rgba[opaque][:, :3]).all()


def test_sample_greyscale_camera_channels_equal():
    """Real L sample: all three channels equal the grey values."""
    with Image.open(SAMPLES / "greyscale_camera.png") as img:
        grey = np.asarray(img)
        out = np.asarray(to_rgb(img))
    for c in range(3):
        assert (out[..., c] == grey).all()


@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".jpg", ".png")))
def test_sample_images_load_in_every_mode(name):
    """Every committed sample loads to (S,S,3) uint8 in every resize/decode mode and reports its size."""
    path = str(SAMPLES / name)
    with Image.open(path) as img:
        true_size = img.size
    for resize in ("squash", "crop", "pad"):
        for decode in ("draft", "full"):
            pixels, size = load(path, 48, resize=resize, decode=decode)
            assert size == true_size
            assert pixels.std() > 1  # a real picture, not a blank canvas


# --------------------------------------------------------------------------- multi-frame


def test_animated_gif_first_frame(tmp_path):
    """An animated GIF with red, green, blue frames loads as its red first frame."""
    frames = [Image.new("RGB", (SIDE, SIDE), c) for c in (RED, GREEN, BLUE)]
    path = save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3
    pixels, _ = load(path)
    assert_bands(pixels, [RED], tol=2)


def test_animated_gif_first_frame_after_seek(tmp_path, monkeypatch):
    """Even if the file is handed over positioned on a later frame, frame 0 is decoded."""
    frames = [Image.new("RGB", (SIDE, SIDE), c) for c in (GREEN, BLUE)]
    path = save(frames[0], tmp_path / "anim2.gif", save_all=True, append_images=frames[1:], duration=50)
    real_open = Image.open

    def open_at_last_frame(*args, **kw):
        img = real_open(*args, **kw)
        img.seek(img.n_frames - 1)
        return img

    monkeypatch.setattr(Image, "open", open_at_last_frame)
    pixels, _ = load(path)
    assert_bands(pixels, [GREEN], tol=2)


def test_multipage_tiff_first_page(tmp_path):
    """A multi-page TIFF (different sizes and colours per page) loads as page 1 with page 1's size."""
    pages = [Image.new("RGB", (20, 10), BLUE), Image.new("RGB", (10, 30), RED)]
    path = save(pages[0], tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    with Image.open(path) as check:
        assert check.n_frames == 2
    pixels, size = load(path)
    assert size == (20, 10)
    assert_bands(pixels, [BLUE])


# --------------------------------------------------------------------------- EXIF orientation

QUADRANTS = [[RED, GREEN], [BLUE, YELLOW]]


def stored_for_orientation(upright: np.ndarray, k: int) -> np.ndarray:
    """The pixels a camera stores for an upright picture under EXIF orientation k (from the EXIF spec:
    k says where stored row 0 / column 0 lie in the upright picture)."""
    return {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],  # row 0 top, col 0 right: mirrored
        3: lambda a: a[::-1, ::-1],  # row 0 bottom, col 0 right: 180°
        4: lambda a: a[::-1, :],  # row 0 bottom, col 0 left: flipped
        5: lambda a: a.transpose(1, 0, 2),  # row 0 left, col 0 top: transpose
        6: lambda a: np.rot90(a, 1),  # row 0 right, col 0 top: needs 90° clockwise to show
        7: lambda a: np.rot90(a.transpose(1, 0, 2), 2),  # row 0 right, col 0 bottom: transverse
        8: lambda a: np.rot90(a, -1),  # row 0 left, col 0 bottom: needs 90° anticlockwise
    }[k](upright)


def oriented_jpeg(path: Path, upright: Image.Image, k: int) -> str:
    stored = Image.fromarray(np.ascontiguousarray(stored_for_orientation(np.asarray(upright), k)))
    exif = Image.Exif()
    exif[0x0112] = k
    return save(stored, path, exif=exif, quality=95)


def test_orientation_helper_matches_spec_corners():
    """The test's own helper follows the EXIF table: e.g. orientation 6 stores the upright right edge as row 0."""
    up = np.arange(6).reshape(2, 3)[..., None]  # 2 rows × 3 cols
    # row 0 of the stored picture, read left to right, runs down the named upright edge
    assert stored_for_orientation(up, 6)[0, :, 0].tolist() == [2, 5]  # right edge, top → bottom
    assert stored_for_orientation(up, 8)[0, :, 0].tolist() == [3, 0]  # left edge, bottom → top
    assert stored_for_orientation(up, 5)[0, :, 0].tolist() == [0, 3]  # left edge, top → bottom
    assert stored_for_orientation(up, 7)[0, :, 0].tolist() == [5, 2]  # right edge, bottom → top
    assert stored_for_orientation(up, 2)[0, :, 0].tolist() == [2, 1, 0]
    assert stored_for_orientation(up, 4)[0, :, 0].tolist() == [3, 4, 5]


@pytest.mark.parametrize("decode", ["full", "draft"])
@pytest.mark.parametrize("k", range(1, 9))
def test_exif_orientation_gives_upright_picture(tmp_path, k, decode):
    """For all 8 EXIF orientations the loaded picture is upright and the size is the upright (w, h)."""
    upright = blocks(64, 32, QUADRANTS)
    path = oriented_jpeg(tmp_path / f"o{k}.jpg", upright, k)
    with Image.open(path) as check:
        assert check.getexif()[0x0112] == k
        assert check.size == ((32, 64) if k >= 5 else (64, 32))
    pixels, size = load(path, 32, decode=decode)
    assert size == (64, 32)
    for r in range(2):
        for c in range(2):  # centres of the four 16×16 output quadrants
            assert_colour(pixels, slice(r * 16 + 4, r * 16 + 12), slice(c * 16 + 4, c * 16 + 12), QUADRANTS[r][c], 12)


@pytest.mark.parametrize("k", [1, 6, 8])
def test_exif_orientation_with_draft_keeps_enough_resolution(tmp_path, draft_spy, k):
    """Large rotated JPEG, crop mode: draft reduces, but the decoded picture, turned upright, is still
    at least DRAFT_MARGIN × the resized size both ways yet reduced as far as that allows; the result is upright."""
    upright = blocks(1200, 2400, [[RED], [BLUE]])  # tall: top red, bottom blue
    path = oriented_jpeg(tmp_path / f"big{k}.jpg", upright, k)
    config = cfg(128, resize="crop", decode="draft")
    pixels, size = load_image(path, config)
    assert size == (1200, 2400)
    assert len(draft_spy) == 1
    before, after, _ = draft_spy[0]
    assert after[0] < before[0] and after[1] < before[1]
    assert_draft_scale(before, after, resized_size(1200, 2400, config), rotated=k >= 5)
    assert_colour(pixels, slice(0, 40), slice(None), RED, 8)
    assert_colour(pixels, slice(88, 128), slice(None), BLUE, 8)


# --------------------------------------------------------------------------- resize modes


def test_squash_keeps_split_in_the_middle(tmp_path):
    """squash: a 2:1 image, left half red / right half blue, becomes S×S split at column S/2."""
    path = save(blocks(64, 32, [[RED, BLUE]]), tmp_path / "split.png")
    pixels, size = load(path, 32, resize="squash")
    assert size == (64, 32)
    assert_colour(pixels, slice(None), slice(0, 14), RED, 2)
    assert_colour(pixels, slice(None), slice(18, 32), BLUE, 2)
    left, right = pixels[:, 15].astype(int), pixels[:, 16].astype(int)
    assert (left[:, 0] > left[:, 2]).all() and (right[:, 2] > right[:, 0]).all()


@pytest.mark.parametrize("width, height, grid", [(96, 32, [[GREEN, RED, GREEN]]), (32, 96, [[GREEN], [RED], [GREEN]])])
def test_crop_is_centre_crop(tmp_path, width, height, grid):
    """crop: for a 3:1 image whose outer thirds are green, the centred square (red) fills the output."""
    path = save(blocks(width, height, grid), tmp_path / "thirds.png")
    pixels, size = load(path, 16, resize="crop")
    assert size == (width, height)
    inner = slice(2, 14)  # the outermost pixels may blend with the neighbouring thirds (antialias filter)
    assert_colour(pixels, inner, inner, RED, 1)
    assert (pixels[..., 0].astype(int) > pixels[..., 1].astype(int)).all()  # red dominates everywhere


@pytest.mark.parametrize("width, height", [(64, 32), (32, 64)])
def test_pad_letterboxes_with_pad_colour(tmp_path, width, height):
    """pad: a 2:1 red image is scaled to fit and centred; the bars are exactly PAD_COLOR."""
    path = save(Image.new("RGB", (width, height), RED), tmp_path / "pad.png")
    pixels, size = load(path, 32, resize="pad")
    assert size == (width, height)
    pad = np.array(PAD_COLOR, dtype=np.uint8)
    view = pixels if width > height else pixels.transpose(1, 0, 2)  # bars on top/bottom
    assert (view[:8] == pad).all() and (view[24:] == pad).all()
    assert_colour(view, slice(8, 24), slice(None), RED, 1)


def test_resized_size_each_mode():
    """resized_size: squash S×S; crop shorter side → S; pad longer side → S; never below 1."""
    s = 100
    assert resized_size(400, 200, cfg(s, resize="squash")) == (s, s)
    assert resized_size(30, 70, cfg(s, resize="squash")) == (s, s)
    assert resized_size(400, 200, cfg(s, resize="crop")) == (200, 100)
    assert resized_size(200, 400, cfg(s, resize="crop")) == (100, 200)
    assert resized_size(50, 50, cfg(s, resize="crop")) == (100, 100)
    assert resized_size(400, 200, cfg(s, resize="pad")) == (100, 50)
    assert resized_size(200, 400, cfg(s, resize="pad")) == (50, 100)
    assert resized_size(10000, 10, cfg(s, resize="pad")) == (100, 1)


def test_unknown_resize_mode_raises(tmp_path):
    """An unknown resize mode is an error, not a silent default."""
    path = save(Image.new("RGB", (8, 8), RED), tmp_path / "x.png")
    with pytest.raises(ValueError):
        load_image(path, cfg(8, resize="stretch"))


# --------------------------------------------------------------------------- draft decode


def test_mpo_phone_pictures_are_draft_decoded_like_jpegs(tmp_path, draft_spy):
    """Many cameras write MPO (JPEG + a second picture) into .jpg: it is JPEG-coded, so draft applies."""
    first, second = gradient(2000, 1500), gradient(640, 480)
    mpo = tmp_path / "phone.jpg"
    first.save(mpo, format="MPO", save_all=True, append_images=[second], quality=90)
    with Image.open(mpo) as img:
        assert img.format == "MPO"
    jpeg = save(first, tmp_path / "same.jpg", quality=90)
    draft, size = load_image(mpo, cfg(224, decode="draft"))
    assert size == (2000, 1500) and len(draft_spy) == 1
    before, after, _ = draft_spy[0]
    assert before == (2000, 1500) and after[0] < 2000  # decoded at a reduced scale
    np.testing.assert_array_equal(draft, load_image(jpeg, cfg(224, decode="draft"))[0])  # as the plain JPEG


def test_jpeg_draft_close_to_full_but_reduced(tmp_path, draft_spy):
    """A 2000×1500 smooth JPEG: draft output ≈ full output, and draft really decoded at reduced scale."""
    path = save(gradient(2000, 1500), tmp_path / "big.jpg", quality=90)
    config_draft, config_full = cfg(224, decode="draft"), cfg(224, decode="full")
    full, size_full = load_image(path, config_full)
    assert draft_spy == []  # full decode never asks for a draft
    draft, size_draft = load_image(path, config_draft)
    assert size_full == size_draft == (2000, 1500)
    assert len(draft_spy) == 1
    before, after, _ = draft_spy[0]
    assert before == (2000, 1500)
    assert after[0] < 2000 and after[1] < 1500
    assert_draft_scale(before, after, resized_size(2000, 1500, config_draft))
    assert np.abs(full.astype(int) - draft.astype(int)).mean() < 3


def test_png_unaffected_by_draft(tmp_path, draft_spy):
    """PNG: decode="draft" and "full" give identical pixels, and no draft is requested."""
    path = save(gradient(600, 400), tmp_path / "big.png")
    draft, _ = load(path, 64, decode="draft")
    full, _ = load(path, 64, decode="full")
    assert draft_spy == []
    assert np.array_equal(draft, full)


def test_small_jpeg_draft_does_not_reduce(tmp_path, draft_spy):
    """A JPEG smaller than DRAFT_MARGIN × S is decoded at full scale even in draft mode."""
    path = save(gradient(300, 200), tmp_path / "small.jpg", quality=90)
    draft, _ = load(path, 224, decode="draft")
    full, _ = load(path, 224, decode="full")
    assert all(before == after for before, after, _ in draft_spy)
    assert np.array_equal(draft, full)


# --------------------------------------------------------------------------- failures


def jpeg_bytes(size=(256, 192)) -> bytes:
    buf = io.BytesIO()
    gradient(*size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_bytes(size=(256, 192)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def broken_files(tmp_path: Path) -> dict[str, str]:
    """name → path of files that are not readable images."""
    return {
        "zero_byte": write(tmp_path / "empty.jpg", b""),
        "truncated_jpeg": write(tmp_path / "cut.jpg", jpeg_bytes()[: len(jpeg_bytes()) // 2]),
        "truncated_png": write(tmp_path / "cut.png", png_bytes()[: len(png_bytes()) // 2]),
        "text_as_jpg": write(tmp_path / "notes.jpg", b"this is not an image\n" * 20),
        "missing": str(tmp_path / "missing.jpg"),
    }


@pytest.mark.parametrize("decode", ["draft", "full"])
@pytest.mark.parametrize("kind", ["zero_byte", "truncated_jpeg", "truncated_png", "text_as_jpg", "missing"])
def test_unreadable_files_raise(tmp_path, kind, decode):
    """Each kind of broken file makes load_image raise an OSError (incl. UnidentifiedImageError)."""
    path = broken_files(tmp_path)[kind]
    with pytest.raises(OSError):
        load_image(path, cfg(32, decode=decode))


def test_truncated_large_jpeg_raises_in_draft_mode(tmp_path):
    """A truncated JPEG big enough for a reduced draft decode still fails, not a grey-filled picture."""
    data = jpeg_bytes((2000, 1500))
    path = write(tmp_path / "bigcut.jpg", data[: len(data) * 2 // 3])
    with pytest.raises(OSError):
        load_image(path, cfg(64, decode="draft"))


def test_decompression_bomb_over_limit_raises(tmp_path, monkeypatch):
    """Over MAX_IMAGE_PIXELS (warning range, ≤ 2×) raises instead of warning; over 2× raises too."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warn_range = save(Image.new("RGB", (40, 40), RED), tmp_path / "bomb_warn.png")  # 1600 px
    error_range = save(Image.new("RGB", (64, 64), RED), tmp_path / "bomb_err.jpg")  # 4096 px
    with pytest.raises(Image.DecompressionBombWarning):
        load_image(warn_range, cfg(8))
    with pytest.raises(Image.DecompressionBombError):
        load_image(error_range, cfg(8))
    under = save(Image.new("RGB", (30, 30), RED), tmp_path / "fine.png")  # 900 px: still fine
    load(under, 8)


def test_image_dataset_turns_failures_into_one_line_records(tmp_path, monkeypatch):
    """ImageDataset: good images give pixels, every failure gives (index, None, None, one-line error)."""
    broken = broken_files(tmp_path)
    good = save(Image.new("RGB", (20, 20), GREEN), tmp_path / "good.png")
    bomb = save(Image.new("RGB", (64, 64), RED), tmp_path / "bomb.png")
    paths = [good, *broken.values(), good, bomb]
    sources = [Source(path=p, key=f"k{i}", root_index=0) for i, p in enumerate(paths)]
    dataset = ImageDataset(sources, ImageLoader(cfg(8)))
    assert len(dataset) == len(paths)
    items = [dataset[i] for i in range(len(paths) - 1)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # only the last one is read under the limit
    items.append(dataset[len(paths) - 1])
    for i, (path, (index, pixels, size, error, _)) in enumerate(zip(paths, items)):
        assert index == i
        if path == good:
            assert error is None and size == (20, 20) and pixels.shape == (8, 8, 3)
        else:
            assert pixels is None and size is None
            assert isinstance(error, str) and error.strip() and "\n" not in error
            name, sep, detail = error.partition(": ")
            assert sep and name.isidentifier() and detail, error
    assert items[paths.index(broken["missing"])][3].startswith("FileNotFoundError")
    assert "DecompressionBomb" in items[-1][3]
    assert not any("DecompressionBomb" in (item[3] or "") for item in items[:-1])


# --------------------------------------------------------------------------- config and normalisation


def test_config_to_json_records_settings():
    """to_json is valid JSON with image_size, resize, decode, mean and std as configured."""
    config = PreprocessConfig(image_size=336, resize="pad", decode="full", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    record = json.loads(config.to_json())
    assert record["image_size"] == 336
    assert record["resize"] == "pad"
    assert record["decode"] == "full"
    assert record["mean"] == [0.5, 0.4, 0.3]
    assert record["std"] == [0.2, 0.25, 0.3]
    assert record["pad_color"] == list(PAD_COLOR) and record["background"] == list(BACKGROUND)
    assert json.loads(PreprocessConfig().to_json()) != record  # settings change the record


def test_normalize_on_device_matches_numpy():
    """uint8 (B,H,W,3) → (B,3,H,W) float32 equal to (x/255 − mean)/std computed in numpy."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    pixels[0, 0, 0] = (0, 128, 255)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = normalize_on_device(torch.from_numpy(pixels), mean, std, torch.float32)
    assert out.shape == (2, 3, 5, 4) and out.dtype == torch.float32
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32)
    want = (x / np.float32(255) - np.array(mean, np.float32)[None, :, None, None]) / np.array(std, np.float32)[
        None, :, None, None
    ]
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-6, atol=1e-6)
    assert out[0, 2, 0, 0].item() == pytest.approx((1.0 - mean[2]) / std[2], abs=1e-5)


def test_normalize_on_device_casts_dtype():
    """The dtype argument casts the result (bfloat16), after float32 arithmetic."""
    pixels = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (1, 3, 3, 3), dtype=np.uint8))
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    out = normalize_on_device(pixels, mean, std, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 3, 3)
    want = (pixels.permute(0, 3, 1, 2).numpy().astype(np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(out.float().numpy(), want, atol=1e-2)
    assert out.min().item() >= -1.0 and out.max().item() <= 1.0


# --------------------------------------------------------------------------- declared bit depth
def _pgm(path, values: np.ndarray, maxval: int):
    path.write_bytes(f"P5\n{values.shape[1]} {values.shape[0]}\n{maxval}\n".encode() + values.astype(">u2").tobytes())
    return path


@pytest.mark.parametrize("maxval", [65535, 1023, 4095])
def test_a_pgm_takes_its_range_from_its_maxval_not_from_its_values(tmp_path, maxval):
    """A dark 16-bit PGM (samples 0–236 of 65535) is nearly black, not 257× brighter; a 10- or
    12-bit one spans its maxval."""
    ramp = np.tile(np.linspace(0, 1, 64), (48, 1))  # (48, 64), 0 … 1
    dark = np.rint(ramp * 236).astype(np.uint16)
    full = np.rint(ramp * maxval).astype(np.uint16)
    for name, values, top in (("dark", dark, 236 / maxval * 255), ("full", full, 255)):
        pixels, size = load_image(_pgm(tmp_path / f"{name}.pgm", values, maxval), cfg(64, decode="full"))
        assert size == (64, 48)
        assert abs(int(pixels.max()) - top) <= 1, (name, maxval, pixels.max(), top)


def test_sixteen_bit_greyscale_png_and_tiff_are_read_by_their_declared_depth(tmp_path):
    dark = np.tile(np.arange(0, 237, dtype=np.uint16), (16, 1))  # samples 0–236 of 65535
    for suffix in ("png", "tif"):
        path = tmp_path / f"dark.{suffix}"
        Image.fromarray(dark).save(path)
        pixels, _ = load_image(path, cfg(16, decode="full"))
        assert pixels.max() <= 1, suffix  # 236 / 257 rounds to 1


def test_a_sixteen_bit_greyscale_png_with_a_transparent_level_composites_it_over_white(tmp_path):
    values = np.full((32, 32), 20000, np.uint16)
    values[:, 16:] = 777  # the tRNS grey level: transparent
    path = tmp_path / "trns16.png"
    Image.fromarray(values).save(path, transparency=777)
    with Image.open(path) as img:
        assert img.mode.startswith("I;16") and img.info.get("transparency") == 777
    rgb = np.asarray(to_rgb(Image.open(path)))
    assert (rgb[:, 16:] == BACKGROUND).all() and (rgb[:, :16] == round(20000 / 257)).all()


# --------------------------------------------------------------------------- TIFF orientation
TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
         5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_90}


@pytest.mark.parametrize("mode", ["L", "RGB", "I;16", "1", "RGBA"])
@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
def test_tiff_orientation_and_size_are_right_in_every_orientation(tmp_path, mode, compression):
    """Pillow ≥ 11 turns some TIFFs itself (reporting their size upright) and scrambles uncompressed
    greyscale ones in orientations 5–8: every orientation must give the upright picture and size."""
    base = np.zeros((40, 60), np.uint8)
    base[:10, :20], base[30:, 45:] = 255, 128  # marks that show any flip or turn
    picture = {"1": Image.fromarray(base > 100), "I;16": Image.fromarray(base.astype(np.uint16) * 257)}.get(
        mode, Image.fromarray(base).convert(mode))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.tif"
        picture.save(path, exif=exif, **({"compression": compression} if compression else {}))
        upright = picture.transpose(TURNS[orientation]) if orientation > 1 else picture
        rgb, size = decode_rgb(str(path), "full", lambda w, h: (w, h))
        assert size == upright.size == rgb.size, (orientation, size)
        np.testing.assert_array_equal(np.asarray(rgb), np.asarray(to_rgb(upright)), err_msg=f"orientation {orientation}")
        with open(path, "rb") as handle:  # from a file object, as the workers read it
            assert decode_rgb(handle, "full", lambda w, h: (w, h))[1] == upright.size
