"""Dataset + DataLoader: decoding in worker processes; failures travel as records, never as exceptions.

A batch holds the images that decoded (uint8, stacked) and, separately, the ones that did
not (with a one-line reason), each tagged with its position in the source list, so no image
can ever take another's row.
"""

from __future__ import annotations

import multiprocessing
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vitcore.errors import one_line
from vitcore.imaging.decode import JpegFile, is_over_pixel_limit, over_pixel_limit, pixel_limit
from vitcore.imaging.sniff import HEAD_BYTES, content_kind, decodes, misnamed_note
from vitcore.inputs.remote import scrub


@dataclass
class Failure:
    index: int  # position in the source list
    error: str  # one line


@dataclass
class Batch:
    indices: list[int]  # positions in the source list of the decoded images, in order
    pixels: torch.Tensor | list[torch.Tensor]  # (B, S, S, 3) uint8; a list of (H_i, W_i, 3) when sizes differ
    sizes: list[tuple[int, int]]  # original upright (width, height) per decoded image
    failures: list[Failure]
    meta: dict[int, dict[str, str]] | None = None  # --keep / --columns: source index → name → text
    # --decode gpu: JPEGs still encoded; the main process decodes them on the device
    # (gpu_decode.GpuJpegDecoder) and merges them in.
    jpegs: "EncodedJpegs | None" = None

    def pin_memory(self) -> "Batch":  # called by the DataLoader's pinning thread on CUDA
        if isinstance(self.pixels, list):
            self.pixels = [p.pin_memory() for p in self.pixels]
        else:
            self.pixels = self.pixels.pin_memory()
        return self


@dataclass
class EncodedJpegs:
    """A batch's JPEGs, still encoded, in one buffer (one shared-memory block, not one per file)."""

    indices: list[int]  # positions in the source list
    sizes: list[tuple[int, int]]  # upright (width, height)
    orientations: list[int]
    data: torch.Tensor  # every file's bytes, one after another (1-D uint8)
    offsets: list[int]  # file i is data[offsets[i]:offsets[i + 1]]

    @classmethod
    def gather(cls, items: list[tuple[int, JpegFile]]) -> "EncodedJpegs":
        offsets = np.concatenate([[0], np.cumsum([len(f.data) for _, f in items])]).tolist()
        return cls(
            indices=[i for i, _ in items], sizes=[f.size for _, f in items],
            orientations=[f.orientation for _, f in items],
            data=torch.from_numpy(np.concatenate([f.data for _, f in items])), offsets=offsets,
        )

    def file(self, i: int) -> torch.Tensor:
        return self.data[self.offsets[i]:self.offsets[i + 1]]


_FILE_OBJECT = re.compile(r"<_io\.Buffered\w+ name=('.*?'|\".*?\"|\d+)>")
_STORE_FILE = re.compile(r"<File-like object \w+, ([^>]*)>")  # fsspec's name for an object it reads


def describe_error(err: BaseException, pixel_limit_applied: int | None = None, command: str = "run") -> str:
    """An exception → one line a person can read ("OSError: image file is truncated");
    ``pixel_limit_applied``: the --max-image-pixels of ``command`` the picture was read under (None:
    Pillow's own)."""
    if is_over_pixel_limit(err):
        return over_pixel_limit(err, pixel_limit_applied, command)
    text = one_line(err, None) or "no details"
    text = _FILE_OBJECT.sub(lambda m: m.group(1), text)  # Pillow names a file object by its repr
    text = scrub(_STORE_FILE.sub(lambda m: m.group(1), text))  # and no URL's credentials or query in a record
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        text = err.strerror
    if isinstance(err, MemoryError):
        text = "not enough memory to decode and resize this picture" + ("" if text == "no details" else f" ({text})")
    return f"{type(err).__name__}: {text}"[:500]


def _content_note(source, err: BaseException) -> str:
    """What a failed input's first bytes say, for its record: a kind other than its name's (a JPEG
    named .mp4: rename it), or, where Pillow only says "cannot identify image file", the picture
    format it starts as (a PNG with a broken checksum: damaged, not a foreign file)."""
    try:
        with source.open() as handle:
            found = content_kind(handle.read(HEAD_BYTES))
    except Exception:  # unreadable: its record already says why
        return ""
    note = misnamed_note(source.key, found)
    if note or not str(err).startswith("cannot identify image file"):  # (HEIC, AVIF: said already)
        return note
    if found is None or found[0] != "picture" or not decodes(found[1]):
        return ""
    return f" (it starts as a {found[1]} file: damaged, or a variant of it that Pillow cannot read)"


class ImageDataset(Dataset):
    """Items are (index, pixels or None, size, error or None, meta); holds no open files (fork-safe).

    ``loader`` is a family's worker side: ``loader.load(file object)`` → (uint8 (H, W, 3) pixels,
    (T, H, W, 3) frames of a clip, or a JpegFile left for the GPU decoder; original upright
    (width, height)[, the loader's own text: name → text]). ``meta``: the names of the text kept
    beside each image (a source's ``extras``), read with it. ``max_image_pixels``: Pillow's
    decompression-bomb limit while decoding (None: Pillow's own; 0: none).
    """

    def __init__(self, sources: list, loader, meta: tuple[str, ...] = (), max_image_pixels: int | None = None):
        self.sources = sources
        self.loader = loader
        self.meta = meta
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        source = self.sources[index]
        try:
            with source.open() as handle, pixel_limit(self.max_image_pixels):
                pixels, size, *own = self.loader.load(handle)  # own: the loader's text for this input, if any
            return index, pixels, size, None, {**(source.extras(self.meta) if self.meta else {}), **(own[0] if own else {})}
        except Exception as err:  # any failure of one image is that image's record
            return index, None, None, describe_error(err, self.max_image_pixels) + _content_note(source, err), {}


def collate(items) -> Batch:
    decoded = [item for item in items if item[3] is None]
    ok = [item for item in decoded if not isinstance(item[1], JpegFile)]  # (H, W, 3) pixels
    jpegs = [(item[0], item[1]) for item in decoded if isinstance(item[1], JpegFile)]
    failures = [Failure(index=i, error=err) for i, _, _, err, _ in items if err is not None]

    if ok and len({item[1].shape for item in ok}) > 1:  # native resolution: sizes differ
        pixels = [torch.from_numpy(np.require(item[1], requirements=("C", "W"))) for item in ok]
    elif ok:
        pixels = torch.from_numpy(np.stack([item[1] for item in ok]))  # (B, S, S, 3) uint8
    else:
        pixels = torch.empty((0, 0, 0, 3), dtype=torch.uint8)
    return Batch(
        indices=[item[0] for item in ok],
        pixels=pixels,
        sizes=[item[2] for item in ok],
        failures=failures,
        meta={item[0]: item[4] for item in decoded if item[4]},
        jpegs=EncodedJpegs.gather(jpegs) if jpegs else None,
    )


def default_workers() -> int:
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def make_loader(sources: list, image_loader, batch_size: int, workers: int, pin_memory: bool,
                worker_init_fn=None, meta: tuple[str, ...] = (), max_image_pixels: int | None = None) -> DataLoader:
    """A sequential loader; worker processes start when it is first iterated.

    Workers are forked (fast start) and must be started before the output HDF5 file is opened
    for writing, so no worker ever inherits a writable handle (run/pipeline.py starts them, then
    Output.open_writer opens the file).
    """
    context = multiprocessing.get_context("fork") if workers > 0 and os.name == "posix" else None
    return DataLoader(
        ImageDataset(sources, image_loader, meta, max_image_pixels),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        multiprocessing_context=context,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=worker_init_fn if workers > 0 else None,
    )
