"""Looking at tokens: PCA colour maps of patch tokens, and contact sheets (Pillow and numpy only)."""

from __future__ import annotations

import functools
import json

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vitcore.errors import UsageError, VitExtractError
from vitcore.imaging.decode import decode_rgb, pixel_limit
from vitcore.consumers.tokens import TokenFile

THUMB = 224  # side of the square each picture and each map is fitted into on a sheet
GAP = 8
CAPTION = 22  # caption strip height in pixels
BACKDROP = (255, 255, 255)


# -- PCA ---------------------------------------------------------------------------------
class PcaProjection:
    """The first three principal components of a set of tokens, scaled to colours 0..255.

    Fitted once (on one image, or on all chosen images with --joint) and applied to each image,
    so colours are comparable across images in the joint case. Component signs are fixed (largest
    loading positive) so the same tokens always give the same colours.
    """

    def __init__(self, tokens: np.ndarray):
        x = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)  # (M, D)
        self.center = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - self.center, full_matrices=False)
        components = vt[:3]  # (≤3, D)
        signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
        self.components = components * signs[:, None]
        projected = (x - self.center) @ self.components.T  # (M, ≤3)
        low = np.percentile(projected, 1, axis=0)
        high = np.percentile(projected, 99, axis=0)
        self.middle = (low + high) / 2
        # One scale for all three channels (the widest component's 1–99 % range): a component that
        # is only noise stays near mid-grey instead of being stretched into loud colours.
        self.span = max(float((high - low).max()), 1e-12)

    def rgb(self, tokens: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """(T, D) tokens of one image → (rows, cols, 3) uint8 colours on its patch grid."""
        projected = (tokens.astype(np.float64) - self.center) @ self.components.T  # (T, ≤3)
        scaled = np.clip(0.5 + (projected - self.middle) / self.span, 0.0, 1.0) * 255.0
        if scaled.shape[1] < 3:  # fewer than 3 components (tiny inputs): grey for the missing ones
            scaled = np.concatenate([scaled, np.full((len(scaled), 3 - scaled.shape[1]), 128.0)], axis=1)
        return np.rint(scaled).astype(np.uint8).reshape(grid[0], grid[1], 3)


def pca_maps(token_sets: list[np.ndarray], grids: list[tuple[int, int]], joint: bool = False) -> list[np.ndarray]:
    """One (rows, cols, 3) colour map per image: PCA per image, or one PCA over all with joint."""
    if joint:
        projection = PcaProjection(np.concatenate([t.reshape(-1, t.shape[-1]) for t in token_sets]))
        return [projection.rgb(t, g) for t, g in zip(token_sets, grids)]
    return [PcaProjection(t).rgb(t, g) for t, g in zip(token_sets, grids)]


# -- pictures ----------------------------------------------------------------------------
def as_encoder_saw_it(opener, frame, max_pixels: int | None = None) -> Image.Image | None:
    """The original picture (``opener()`` gives its bytes as a file object), upright and RGB,
    framed as the encoder saw it (``frame``: TokenFile.as_seen, the file's encoder family's rule);
    None when it cannot be read any more. ``max_pixels``: the pixel limit it is read under (None:
    Pillow's own; see row_pixel_limit for a stored row's)."""
    try:  # decoded as a run decodes it (orientation, bit depth, alpha), without the resize
        with opener() as handle, pixel_limit(max_pixels):
            picture, _ = decode_rgb(handle, "full", lambda w, h: (w, h))
    except Exception:  # moved, deleted or unreadable since extraction: drawn as a placeholder
        return None
    return frame(picture)


def row_pixel_limit(f, row) -> int | None:
    """The pixel limit to read a stored row's original under: its own size where a run read it over
    Pillow's limit (raised for it), so that it is drawn, while a file put in its place since, larger,
    is still refused; None (Pillow's limit) otherwise."""
    width, height = (int(v) for v in f.h5["image_size"][f.row_number(row)])
    return width * height if width * height > (Image.MAX_IMAGE_PIXELS or 0) else None


def fit(img: Image.Image, box: int = THUMB) -> Image.Image:
    """Scale so the longer side is ``box`` (aspect kept)."""
    scale = box / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC)


def placeholder(text: str, size: tuple[int, int] = (THUMB, THUMB)) -> Image.Image:
    img = Image.new("RGB", size, (200, 200, 200))
    ImageDraw.Draw(img).text((8, size[1] // 2 - 8), text, fill=(60, 60, 60), font=_font())
    return img


CAPTION_FONTS = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "LiberationSans-Regular.ttf", "Arial.ttf")


@functools.lru_cache(maxsize=4)
def _font(size: int = 13):
    """A system font that draws accented letters where there is one (Pillow finds it in the usual
    font folders), else Pillow's own (ASCII only: other characters are escaped, see printable)."""
    for name in CAPTION_FONTS:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def printable(text: str) -> str:
    """One line of text for a caption: control characters (a newline in a key, say), and characters
    the caption font has no glyph for (it would draw a box), as escapes (\\u6771)."""
    return "".join(c if _drawable(c) else c.encode("unicode_escape").decode("ascii") for c in text)


@functools.lru_cache(maxsize=4096)
def _drawable(char: str) -> bool:
    if not char.isprintable():
        return False
    if char.isascii():
        return True
    return _glyph(char) != _glyph(NO_GLYPH)  # not the missing-glyph box


def _glyph(char: str) -> bytes:
    """The pixels of one character drawn in the caption font."""
    drawn = Image.new("L", (40, 30))
    ImageDraw.Draw(drawn).text((5, 5), char, fill=255, font=_font())
    return drawn.tobytes()


NO_GLYPH = "\U0010fffd"  # a private-use character no font draws: its box is the missing-glyph box


def _caption(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, width: int) -> None:
    draw.text(xy, fitted(text, width), fill=(0, 0, 0), font=_font())


def fitted(text: str, width: int) -> str:
    """A caption that fits ``width`` pixels: printable, cut in the middle when too long, so that
    its end (the file name, which tells keys under long roots apart) stays."""
    font, text = _font(), printable(text)
    if font.getlength(text) <= width:
        return text
    head, tail = text[: len(text) // 2], text[len(text) // 2:]
    while (head or tail) and font.getlength(f"{head}…{tail}") > width:
        head, tail = (head[:-1], tail) if len(head) > len(tail) // 2 else (head, tail[1:])
    return f"{head}…{tail}"


def sheet(cells: list[tuple[list[Image.Image], str]], columns: int) -> Image.Image:
    """A grid of cells; each cell is 1+ images side by side (each fitted to THUMB) over a caption.

    Size: columns' × cell width, rows × (THUMB + CAPTION + GAP) + GAP, where a cell of k images is
    k·THUMB + (k−1)·GAP wide.
    """
    per_cell = max(len(images) for images, _ in cells)
    cell_w = per_cell * THUMB + (per_cell - 1) * GAP
    cell_h = THUMB + CAPTION
    columns = max(1, min(columns, len(cells)))
    rows = -(-len(cells) // columns)
    out = Image.new("RGB", (GAP + columns * (cell_w + GAP), GAP + rows * (cell_h + GAP)), BACKDROP)
    draw = ImageDraw.Draw(out)
    for n, (images, text) in enumerate(cells):
        x0 = GAP + (n % columns) * (cell_w + GAP)
        y0 = GAP + (n // columns) * (cell_h + GAP)
        for k, img in enumerate(images):
            thumb = fit(img)
            x = x0 + k * (THUMB + GAP) + (THUMB - thumb.width) // 2
            out.paste(thumb, (x, y0 + (THUMB - thumb.height) // 2))
        _caption(draw, (x0, y0 + THUMB + 4), text, cell_w)
    return out


# -- the show command --------------------------------------------------------------------
def token_sheet(
    path: str, keys: list[str] | None = None, first: int | None = None, joint: bool = False, columns: int = 2
) -> tuple[Image.Image, list[str]]:
    """The sheet `vit-extract show` draws: each picture beside the PCA map of its patch tokens."""
    with TokenFile(path) as f:
        if f.settings.get("pooling", "none") != "none":
            raise UsageError(
                f"{path} holds pooled vectors (pooling {f.settings['pooling']}), so it has no patch tokens "
                "to draw; extract with --pool none to see token maps"
            )
        if not len(f):
            raise VitExtractError(f"{path} has no rows to show")
        rows = _choose_rows(f, keys, first)
        token_sets = [f.patch_tokens(i) for i in rows]
        grids = [f.token_grid(i) for i in rows]
        clips = {i: clip for i in rows if (clip := _clip_record(f, i)) is not None}
        # A clip's tokens are t temporal patches of one grid each: as t pictures of that grid.
        slices = [(t.reshape(-1, g[0] * g[1], t.shape[-1]) if i in clips else t[None]) for i, t, g in
                  zip(rows, token_sets, grids)]
        projection = PcaProjection(np.concatenate([t.reshape(-1, t.shape[-1]) for t in token_sets])) if joint else None
        chosen = [f.shown_key(i) for i in rows]
        cells = []
        for i, tokens, grid, parts in zip(rows, token_sets, grids, slices):
            fitted_on = projection or PcaProjection(tokens)  # one PCA per row: a clip's patches share colours
            if i in clips:
                cells.append(_clip_cell(f, i, clips[i], [fitted_on.rgb(p, grid) for p in parts], grid, chosen[len(cells)]))
                continue
            colours = fitted_on.rgb(tokens, grid)
            picture = as_encoder_saw_it(lambda: f.open_original(i), f.as_seen, row_pixel_limit(f, i))  # noqa: B023
            if picture is None:
                picture = placeholder("original not found")
                token_map = Image.fromarray(colours).resize((THUMB, THUMB), Image.Resampling.NEAREST)
            else:
                shown = fit(picture)
                token_map = Image.fromarray(colours).resize(shown.size, Image.Resampling.NEAREST)
                picture = shown
            shape = "x".join(str(n) for n in tokens.shape)  # "x": the default font has no "×"
            cells.append(([picture, token_map], f"{chosen[len(cells)]}  ({shape}, grid {grid[0]}x{grid[1]})"))
    return sheet(cells, columns), chosen


CLIP_SLICES = 3  # temporal patches of a clip drawn (frame beside map), the first ones


def _clip_record(f: TokenFile, row: int) -> dict | None:
    """A clip's recorded frames and timing (meta/video), or None for a picture."""
    if "meta/video" not in f.h5:
        return None
    text = f.h5["meta/video"][row]
    text = text.decode() if isinstance(text, bytes) else str(text)
    return json.loads(text) if text else None


def _clip_cell(f: TokenFile, row: int, clip: dict, maps: list[np.ndarray], grid, key: str):
    """A clip's cell: for each of its first temporal patches, the first frame it holds beside the
    colour map of its tokens (placeholders when the clip can no longer be read)."""
    per_patch = -(-len(clip["frames"]) // len(maps))  # frames per temporal patch (the last one padded)
    shown = list(range(min(len(maps), CLIP_SLICES)))
    wanted = [clip["frames"][min(j * per_patch, len(clip["frames"]) - 1)] for j in shown]
    try:
        from vitcore.imaging.video import open_clip, read_frames

        with f.open_original(row) as handle, open_clip(handle) as container:
            frames = [Image.fromarray(frame) for frame in read_frames(container, wanted)]
    except Exception:  # moved, deleted, unreadable or PyAV missing: placeholders
        frames = [None] * len(shown)
    images = []
    for j, frame in zip(shown, frames):
        picture = fit(frame) if frame is not None else placeholder("original not found")
        images += [picture, Image.fromarray(maps[j]).resize(picture.size, Image.Resampling.NEAREST)]
    seconds = ", ".join(f"{s:.1f}" for s in clip["timestamps"][:len(shown)])
    more = f" of {len(maps)}" if len(maps) > len(shown) else ""
    return images, f"{key}  ({len(maps)} temporal patches, grid {grid[0]}x{grid[1]}; shown at {seconds} s{more})"


def _choose_rows(f: TokenFile, keys: list[str] | None, first: int | None) -> list[int]:
    if keys:
        missing = [k for k in keys if k not in f]
        if len(missing) == 1:
            raise UsageError(f.absent(missing[0]))
        if missing:
            failed = [k for k in missing if f.failure_reason(k) is not None]
            raise UsageError(f"not in {f.path}: {', '.join(missing[:5])}" + (" …" if len(missing) > 5 else "")
                             + (f" ({len(failed)} of them failed when it was made: `vit-extract info {f.path}` "
                                "lists why)" if failed else ""))
        return [f.index(k) for k in keys]
    return list(range(min(first or 8, len(f))))
