"""What every encoder family provides, and what it hands the shared batching path.

A family (an object in its package under vitcore/encoders/, one entry in registry.FAMILIES) has
``name``, ``label``, ``summary``, ``compilable``, ``takes_video``, ``feeds_language_model`` and ``record_without_torch``
(its record() imports no torch: a --resume of other settings is refused before torch loads; a family
whose record needs torch has ``weights_record(opts)`` → WeightsInfo instead, torch-free, so a resume of
other weights, pooling, dtypes or compression is still refused before torch), and answers:

    claims(model, weights)        does this run's --model / --weights belong to me?
    check(opts)                   refuse options I do not take (one-line UsageError)
    record(opts, device)          → RunRecord: what the file will record, without building anything
                                  (a --resume with nothing left to do stops after comparing it)
    build(opts, device, dtype, record) → BuiltEncoder: device side (and, when compilable, its
                                  compiled twin), worker side, what the file records (``record``,
                                  made again when not given), the default batch size on that device
    rebuild(settings, file)       → EncoderOptions that build the encoder a file records (`similar`)
    describe(settings)            → (encoder line, preprocessing line) for `vit-extract info`
    token_grid(encoder, grid_thw) → (rows, cols) the stored patch tokens of one image lie on
    prefix_tokens(encoder)        → how many tokens (CLS, registers) come before them in each stored row
    deepstack_levels(encoder)     → how many DeepStack features its language model takes (0: none)
    framed(picture, preprocessing) → an original picture framed as the encoder saw it (`show`, `similar`)

Family modules import torch only inside record() (not at all where record_without_torch), build() and
rebuild(), so `--help`, `models`,
`info` and the readers stay torch-free. Callers ask a family these questions; none compares its name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from vitcore.errors import UsageError
from vitcore.store.schema import ArraySpec, describe_weights, weights_identity


@dataclass
class Encoded:
    """A family's output for a slice of a batch, before pooling and casting (the runner does those).

    arrays: name → (B, T, W) tensor, or for ragged arrays (Σ T_i, W) with ``counts[name]`` = [T_i].
    """

    arrays: dict[str, Any]
    counts: dict[str, list[int]] = field(default_factory=dict)
    grid_thw: list[tuple[int, int, int]] | None = None  # per image, when the family stores its patch grid

    @property
    def images(self) -> int:
        first = next(iter(self.arrays))
        return len(self.counts[first]) if first in self.counts else len(self.arrays[first])

    def head(self, n: int) -> "Encoded":
        """The first n images (a compiled batch padded with blank images gives them back)."""
        assert not self.counts, "padding is only for fixed-shape outputs"
        return Encoded({k: v[:n] for k, v in self.arrays.items()}, {}, self.grid_thw and self.grid_thw[:n])

    @staticmethod
    def concat(parts: list["Encoded"]) -> "Encoded":
        """Slices of one batch, in order, as one Encoded (after an out-of-memory split, or packed apart)."""
        import torch  # torch: the registry and records stay torch-free

        first = parts[0]
        if len(parts) == 1:
            return first
        return Encoded(
            arrays={k: torch.cat([p.arrays[k] for p in parts]) for k in first.arrays},
            counts={k: [c for p in parts for c in p.counts[k]] for k in first.counts},
            grid_thw=None if first.grid_thw is None else [g for p in parts for g in p.grid_thw],
        )


@dataclass(frozen=True)
class WeightsInfo:
    """Where an encoder's weights came from, as recorded in the output file."""

    # "untrained" (seeded here), "file", or "untrained file": a file of a seeded random
    # initialisation (init-weights), identified by its content like any file, and still untrained.
    source: str
    seed: int | None = None
    path: str | None = None
    sha256: str | None = None

    @property
    def untrained(self) -> bool:
        return self.source in ("untrained", "untrained file")

    def to_json(self) -> str:
        return json.dumps(
            {"source": self.source, "seed": self.seed, "path": self.path, "sha256": self.sha256},
            sort_keys=True,
        )

    def identity(self) -> str:
        """What must match for --resume: the seed, or the file's content (not its path)."""
        return weights_identity(self.to_json())

    def describe(self) -> str:
        return describe_weights(self.to_json())


@dataclass
class RunRecord:
    """What a run of a family records in the file (store_settings reads these), known from the
    options and the checkpoint's files alone: no module is built and no tensor made."""

    name: str  # what the summary calls the encoder ("base", "custom", …)
    encoder_record: str  # JSON, with "family"
    preprocessing: str  # JSON, as this device will really do it
    weights: WeightsInfo
    outputs: tuple[ArraySpec, ...]  # unpooled, "tokens" first
    projector: str = "null"  # JSON: {"dim": P} or null
    grid_thw: bool = False  # store each image's patch grid (t, h, w)
    width: int | None = None  # the blocks' token width D: --dtype auto times products of this width
    embedding_width: int | None = None  # the model's own pooled embedding (--pool model), when it has one
    no_embedding: str = ""  # why a model of a family that has such embeddings has none (the setting that says so)
    notes: list[str] = field(default_factory=list)  # how the run departs from what was asked
    parts: dict = field(default_factory=dict, repr=False)  # the family's own values, for its build()
    # Ragged outputs: (width, height) of an upright picture → tokens per ragged array (a dry run
    # counts a run's tokens from image headers alone). None: every output has a fixed count.
    token_counts: Callable[[int, int], dict[str, int]] | None = field(default=None, repr=False)
    # The same for a video clip, from its header (imaging.video.ClipInfo); None: the family reads no clips.
    clip_token_counts: Callable[[object], dict[str, int]] | None = field(default=None, repr=False)
    # Text the worker side makes for each input, stored row-aligned as meta/<name> (the Qwen-VL
    # families' "video": a clip's frames and timing as JSON, "" for a picture).
    loader_meta: tuple[str, ...] = ()


@dataclass(kw_only=True)
class BuiltEncoder(RunRecord):
    """What a family builds for one run: its RunRecord (what the file records), and the device and
    worker sides."""

    # Device side: a slice of a batch's uint8 pixels on the device — a (B, H, W, 3) tensor, or a
    # list of (H_i, W_i, 3) tensors when sizes differ — → Encoded, unpooled, in the compute dtype.
    encode: Callable[[Any], Encoded]
    # Worker side (pickled into the DataLoader workers): .load(file object) → (uint8 (H, W, 3),
    # original upright (width, height)).
    loader: Any
    # Main process, before encode(): finishes a batch the workers left partly undone (GPU JPEG decode).
    finish_batch: Callable | None = None
    default_batch_size: Callable[[], int] = lambda: 8  # --batch-size auto on this device
    # A compilable family (fixed-shape batches): makes the torch.compile'd twin of encode, the
    # same numbers to the dtype's rounding; None: this family runs eager only.
    compiled_encode: Callable[[], Callable[[Any], Encoded]] | None = None

    @classmethod
    def of(cls, record: RunRecord, **device_side) -> "BuiltEncoder":
        """``record``'s fields, and the device and worker sides; notes from both (a build may add some)."""
        made = {f.name: getattr(record, f.name) for f in fields(RunRecord)}
        made["notes"] = list(record.notes) + list(device_side.pop("notes", []))
        return cls(**made, **device_side)


def checkpoint_config(folder) -> dict | None:
    """A checkpoint folder's config.json as a dict, or None when there is none to read."""
    try:
        with open(os.path.join(folder, "config.json")) as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def describe_prefix(encoder: dict) -> str:
    """`info`'s words for an encoder record's prefix tokens (CLS, registers) and any dropped."""
    kept, dropped = encoder.get("prefix_tokens", 0), encoder.get("prefix_tokens_dropped", 0)
    words = f"{kept} prefix token(s) first" if kept else "no prefix tokens"
    return words + (f" ({dropped} dropped)" if dropped else "")


def distinct_layers(layers, depth: int) -> tuple[int, ...]:
    """--layer values checked against a tower of ``depth`` blocks: each distinct K as given (K counts
    blocks from 0, a negative K from the end; ``-1`` and ``23`` are both stored if both are asked for)."""
    out: list[int] = []
    for k in layers:
        if not -depth <= int(k) < depth:
            raise UsageError(f"--layer {k} is out of range: this encoder has {depth} blocks (0..{depth - 1}, "
                             f"or -{depth}..-1)")
        if int(k) not in out:
            out.append(int(k))
    return tuple(out)
