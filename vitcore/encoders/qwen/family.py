"""The Qwen-VL families: the vision tower of a local Hugging Face checkpoint folder (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL), one class with each family's own values (QWEN3_VL, QWEN2_5_VL, QWEN2_VL at
the end); the towers are qwen3vl.py and qwen2vl.py, their configs config.py, and what they share
processor.py, layers.py and checkpoint.py.

Native resolution: each image keeps its aspect ratio and gets as many tokens as the checkpoint's
processor gives it, so tokens are stored ragged; --resolution N makes every image N × N.

Torch is imported only inside build() and the tower loaders, so `vit-extract --help`, `models`,
`info` and the readers never load it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from vitcore.encoders.base import BuiltEncoder, Encoded, RunRecord, WeightsInfo, checkpoint_config
from vitcore.encoders.qwen.checkpoint import read_tower_config, vision_weights_sha256
from vitcore.encoders.qwen.config import Qwen2VLConfig, Qwen3VLConfig, Qwen25VLConfig
from vitcore.errors import UsageError, VitExtractError
from vitcore.options import EncoderOptions
from vitcore.store.schema import ArraySpec, processor_backend

PROCESSOR_FIELDS = ("min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size", "mean", "std",
                    "rescale_factor")  # what a checkpoint's processor config decides, recorded in the file


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def checkpoint_model_type(folder) -> str | None:
    """config.json's model_type of a folder, or None."""
    return (checkpoint_config(folder) or {}).get("model_type")


# On the CPU a packed sequence holds at most this many patches (a larger image goes alone). The
# matrix products run at their full rate from about 512 rows on, so packing larger images gains
# nothing; and a sequence of several large images makes every activation larger than glibc's
# 32 MiB mmap threshold, so each one is mapped and faulted in afresh, layer after layer. The 8
# sample pictures with the Qwen2.5-VL 3B shape in bf16, batch 4 in one sequence against one image
# at a time: 30 against 10 s of system time, 80 against 67 s (bench/RESULTS.md).
CPU_PACK_PATCHES = 1024


def pack_groups(packed: list, limit: int | None) -> list[list]:
    """Consecutive images in groups of at most ``limit`` patches (an image over it goes alone)."""
    if limit is None:
        return [packed]
    groups, size = [], limit + 1
    for item in packed:
        patches = item[0].shape[0]
        if size + patches > limit:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += patches
    return groups


class QwenVLFamily:
    compilable = False  # image sizes vary batch to batch
    takes_video = True  # video clips beside pictures: temporal patches, t > 1 (encoders/qwen/video.py)
    feeds_language_model = True  # encoder_outputs gives its tokens to transformers' language model
    record_without_torch = True  # the checkpoint's JSON files and its vision tensors' hash: no tensors

    def __init__(self, name: str, label: str, model_types: tuple[str, ...], config, load,
                 features: tuple[str, ...], video: str):
        self.name, self.label, self.model_types = name, label, model_types
        self.video = video  # whose video processor: "qwen2" (Qwen2VLVideoProcessor) or "qwen3"
        self.config = config  # the tower's config class (config.py)
        self.load = load  # (folder, device, dtype) → (the tower, its QwenVLPreprocess)
        self.features = features  # what --features may ask for
        self.summary = (f"the vision tower of a local {label} checkpoint folder "
                        f"(--weights DIR, told by config.json model_type {' or '.join(model_types)})")

    def claims(self, model, weights) -> bool:
        """A checkpoint folder whose config.json names one of this family's model types."""
        if model is not None or not weights or not os.path.isdir(weights):
            return False
        return checkpoint_model_type(weights) in self.model_types

    def check(self, opts) -> None:
        name = self.name
        if not opts.weights or not os.path.isdir(opts.weights):
            raise UsageError(f"--model {name} needs --weights DIR: a local Hugging Face {self.label} checkpoint folder")
        found = checkpoint_model_type(opts.weights)
        if found is not None and found not in self.model_types:
            raise UsageError(f"--model {name}: {opts.weights} holds a {found!r} checkpoint, not "
                             f"{' or '.join(self.model_types)}; drop --model to have it recognised")
        for flag, value in (("--layer", opts.layers), ("--project-dim", opts.project_dim)):
            if value:
                raise UsageError(f"{flag} is for the seed encoders; {name} stores its merger output (see --features)")
        if opts.drop_prefix:
            raise UsageError(f"--drop-prefix is for towers with prefix tokens (CLIP, DINOv2); {name} stores merged "
                             "patch tokens only")
        if opts.resize != "squash":
            raise UsageError(f"--resize is for the seed encoders; {name} keeps the aspect ratio (see --resolution)")
        if opts.decode == "gpu":
            raise UsageError(f"--decode gpu works with the seed encoders; {name} decodes on the CPU exactly as "
                             "its processor does (--decode full)")
        unknown = [f for f in opts.features if f not in self.features]
        if unknown:
            raise UsageError(f"--features {','.join(unknown)}: {name} offers {', '.join(self.features)}")

    def record(self, opts, device):
        """From the checkpoint's JSON files and a hash of its vision tensors' bytes (no tower is built)."""
        from vitcore.encoders.pixels import DEFAULT_BACKEND, TORCH_MODES
        from vitcore.encoders.qwen.processor import QwenVLPreprocess

        cfg, settings = read_tower_config(opts.weights, self.config.from_hf, self.label)
        prep = QwenVLPreprocess.from_settings(settings, backend=opts.processor or DEFAULT_BACKEND)
        if prep.backend == "torchvision" and prep.resample not in TORCH_MODES:
            raise UsageError(f"--processor torchvision: {opts.weights}'s image processor resamples with "
                             f"{prep.interpolation.split()[0]}, which transformers' torchvision backend cannot do; "
                             "use --processor pil")
        if opts.resolution != "native":
            try:
                side = int(opts.resolution)
            except ValueError:
                side = 0
            if side < prep.factor or side % prep.factor:
                raise UsageError(f"--resolution {opts.resolution}: use native or a multiple of {prep.factor}")
            prep = dataclasses.replace(prep, fixed=side)
        decode = opts.decode or "full"
        merge = cfg.spatial_merge_size ** 2  # patches per merged token
        fixed = prep.fixed is not None
        merged_tokens = (prep.fixed // prep.patch_size) ** 2 // merge if fixed else 0

        def spec(name: str, width: int, per_patch: bool = False) -> ArraySpec:
            if fixed:
                return ArraySpec(name, (merged_tokens * (merge if per_patch else 1), width))
            return ArraySpec(name, (width,), ragged=True)

        outputs = [spec("tokens", cfg.out_width)]
        if "last_hidden" in opts.features:
            outputs.append(spec("features/last_hidden", cfg.width, per_patch=True))
        if "deepstack" in opts.features:
            outputs += [spec(f"features/deepstack_{j}", cfg.out_width) for j in range(cfg.deepstack_levels)]
        recorded = dataclasses.asdict(prep)
        recorded.pop("resample")  # recorded by name: "bicubic (torchvision)", "bicubic (Pillow)"
        video, notes = self._video(opts), []
        if video is not None and prep.fixed is not None:
            raise UsageError(f"--resolution {opts.resolution} sizes pictures; clips keep their video processor's size "
                             "(their tokens could not share a fixed shape): use --resolution native with clips, or "
                             "--ext to leave them out")
        if video is not None:  # recorded only when clips are among the inputs: picture files stay as they were
            recorded["video"] = video.to_record()
        elif opts.fps is not None or opts.max_frames is not None:
            notes = ["--fps / --max-frames: no video clips among the inputs; they changed nothing"]
        preprocessing = json.dumps({**recorded, "decode": decode, "resolution": opts.resolution,
                                    "interpolation": prep.interpolation}, sort_keys=True)
        weights = WeightsInfo(source="file", path=os.path.abspath(opts.weights),
                              sha256=vision_weights_sha256(opts.weights))
        def per_output(patches: int) -> dict[str, int]:
            return {o.name: patches if o.name == "features/last_hidden" else patches // merge for o in outputs}

        def token_counts(width: int, height: int) -> dict[str, int]:  # native resolution: per picture
            h, w = prep.target_size(height, width)
            return per_output((h // prep.patch_size) * (w // prep.patch_size))

        def clip_token_counts(info) -> dict[str, int]:  # a clip, from its header (ClipInfo)
            return per_output(math.prod(video.grid(info.frames, info.fps, info.height, info.width)))

        return RunRecord(name=self.name, encoder_record=cfg.to_json(), preprocessing=preprocessing, weights=weights,
                         outputs=tuple(outputs), grid_thw=True, parts={"preprocess": prep, "decode": decode, "video": video},
                         width=cfg.width, token_counts=None if fixed else token_counts, notes=notes,
                         clip_token_counts=clip_token_counts if video is not None else None,
                         loader_meta=("video",) if video is not None else ())

    def _video(self, opts):
        """The checkpoint's video processor with --fps / --max-frames, when clips are among the inputs."""
        if not opts.videos:
            return None
        from vitcore.encoders.qwen.video import video_settings

        return video_settings(opts.weights, self.video).overridden(opts.fps, opts.max_frames)

    def build(self, opts, device, dtype, record=None):
        import torch  # torch: only once a run is under way

        from vitcore.encoders.qwen.layers import choose_attention
        from vitcore.encoders.qwen.processor import QwenVLImageLoader, patchify_torch
        from vitcore.encoders.qwen.video import patchify_video

        record = record or self.record(opts, device)
        prep, video = record.parts["preprocess"], record.parts["video"]
        encoder, _ = self.load(opts.weights, device=device, dtype=dtype)
        if encoder.weights_sha256 != record.weights.sha256 or encoder.cfg.to_json() != record.encoder_record:
            raise VitExtractError(f"{opts.weights} changed while the run started; run it again")
        notes = choose_attention(encoder, device, dtype)  # once, here: a fallback is reported
        merge = encoder.cfg.spatial_merge_size ** 2  # patches per merged token
        wanted = {s.name for s in record.outputs}

        # How many patches one packed sequence may hold (None: the whole batch). See pack_groups.
        limit = CPU_PACK_PATCHES if device.type == "cpu" else None

        def encode(pictures):
            """uint8 pictures (H_i, W_i, 3) and clips (T_i, H_i, W_i, 3) → packed sequences → merged tokens per input."""
            packed = [patchify_video(p, video) if p.ndim == 4 else patchify_torch(p, prep)
                      for p in pictures]  # (t·h·w, 3·T·p·p) each, merge-block order
            return Encoded.concat([encode_packed(group) for group in pack_groups(packed, limit)])

        def encode_packed(packed):
            """[(patches, grid)] → one sequence through the tower → Encoded."""
            grids = [g for _, g in packed]
            counts = [t * h * w // merge for t, h, w in grids]  # merged tokens per image
            out = encoder(torch.cat([x for x, _ in packed]).to(dtype), grids)
            arrays, sizes = {"tokens": out.tokens}, {"tokens": counts}  # (Σ T_i, out)
            if "features/last_hidden" in wanted:
                arrays["features/last_hidden"] = out.last_hidden  # (Σ 4·T_i, D)
                sizes["features/last_hidden"] = [c * merge for c in counts]
            for j, feature in enumerate(out.deepstack):
                if f"features/deepstack_{j}" in wanted:
                    arrays[f"features/deepstack_{j}"], sizes[f"features/deepstack_{j}"] = feature, counts
            return Encoded(arrays, sizes, grids)

        return BuiltEncoder.of(
            record, encode=encode, loader=QwenVLImageLoader(prep, decode=record.parts["decode"], video=video), notes=notes,
            # native-resolution images vary widely in size
            default_batch_size=lambda: 4 if device.type == "cpu" else 32,
        )

    def rebuild(self, settings: dict, file: str):
        from vitcore.encoders.qwen.processor import QwenVLPreprocess  # torch: only once a run is under way

        folder = settings["weights"]["path"]
        if not folder or not os.path.isdir(folder):
            raise VitExtractError(f"the checkpoint {folder} recorded in {file} is gone; cannot encode a new image")
        prep = settings["preprocessing"]
        # The weights' hash does not cover the processor's settings: they must still be the file's.
        _, resolved = read_tower_config(folder, self.config.from_hf, self.label)
        now = QwenVLPreprocess.from_settings(resolved, backend=processor_backend(prep))
        changed = [name for name in PROCESSOR_FIELDS if _plain(getattr(now, name)) != _plain(prep.get(name))]
        if now.interpolation != prep.get("interpolation", "bicubic (Pillow)"):
            changed.append("resample")
        if changed:
            raise VitExtractError(
                f"the image processor of {folder} has changed since {file} was made ({', '.join(changed)}); "
                "cannot encode a new image as its rows were"
            )
        options = EncoderOptions(model=self.name, weights=folder, decode=prep.get("decode", "full"),
                                 resolution=str(prep.get("resolution", "native")), processor=processor_backend(prep))
        recorded = prep.get("video")
        if recorded is None:
            return options
        # A file with clips: a new clip is sampled as its clips were (the same --fps / --max-frames).
        sampled = recorded["do_sample_frames"] and recorded["fps"] is not None
        # --max-frames bounds a sampling processor only (by fps or a frame count): passed back as the run had it
        bounded = recorded["do_sample_frames"] and (recorded["fps"] is not None or recorded.get("num_frames") is not None)
        options = dataclasses.replace(options, videos=True, fps=recorded["fps"] if sampled else None,
                                      max_frames=recorded["max_frames"] if bounded else None)
        if self._video(options).to_record() != recorded:
            raise VitExtractError(f"the video processor of {folder} has changed since {file} was made; "
                                  "cannot encode a new clip as its clips were")
        return options

    def describe(self, settings: dict) -> dict:
        enc, prep = settings["encoder"], settings["preprocessing"]
        width, out = self.config.width_field, self.config.out_width_field
        return {
            "encoder": f"{self.name} vision tower: hidden {enc[width]}, depth {enc['depth']}, "
                       f"heads {enc['num_heads']}, patch {enc['patch_size']}, merge {enc['spatial_merge_size']}, "
                       f"out {enc[out]}",
            "preprocessing": (f"resolution {prep['resolution']} (pixels {prep['min_pixels']}–{prep['max_pixels']})"
                              if prep["resolution"] == "native" else
                              f"resolution {prep['resolution']}×{prep['resolution']} (fixed)")
                             + f", decode {prep['decode']}, processor {processor_backend(prep)} ({prep.get('interpolation')})"
                             + (_clips_described(prep["video"]) if prep.get("video") else ""),
        }

    def framed(self, picture, preprocessing: dict):
        """A picture as the tower saw it: whole, its aspect ratio kept (--resolution N squashes it to N × N)."""
        return picture

    def deepstack_levels(self, encoder: dict) -> int:
        """How many DeepStack features a file's language model needs beside its tokens."""
        return len(encoder.get("deepstack_visual_indexes") or [])

    def token_grid(self, encoder: dict, grid_thw) -> tuple[int, int]:
        """Merged tokens, spatial_merge_size² patches each, in raster order over the merged grid."""
        _, h, w = grid_thw
        merge = encoder.get("spatial_merge_size", 1)
        return h // merge, w // merge

    def prefix_tokens(self, encoder: dict) -> int:
        return 0  # merged patch tokens only


def _clips_described(video: dict) -> str:
    """`info`'s words for the video processor a file's clips went through."""
    name = {"qwen2": "Qwen2VLVideoProcessor", "qwen3": "Qwen3VLVideoProcessor"}.get(video.get("kind"), video.get("kind"))
    if video.get("do_sample_frames") and video.get("fps") is not None:
        frames = f"{video['fps']:g} fps, {video['min_frames']}–{video['max_frames']} frames"
    else:
        frames = "every frame"
    return f"; clips: {name}, {frames}, pixels {video['min_pixels']}–{video['max_pixels']}"


# The towers, built only when a run starts (torch is imported there, not when a family is looked up).
def _load_qwen3vl(folder, device, dtype):
    from vitcore.encoders.qwen.qwen3vl import load_qwen3vl  # torch: only once a run is under way

    return load_qwen3vl(folder, device=device, dtype=dtype)


def _load_qwen25vl(folder, device, dtype):
    from vitcore.encoders.qwen.qwen2vl import load_qwen25vl  # torch: only once a run is under way

    return load_qwen25vl(folder, device=device, dtype=dtype)


def _load_qwen2vl(folder, device, dtype):
    from vitcore.encoders.qwen.qwen2vl import load_qwen2vl  # torch: only once a run is under way

    return load_qwen2vl(folder, device=device, dtype=dtype)


# Qwen3-VL: merger tokens, and on request the tower's last hidden states and the DeepStack features.
QWEN3_VL = QwenVLFamily(name="qwen3-vl", label="Qwen3-VL", model_types=("qwen3_vl", "qwen3_vl_moe"),
                        config=Qwen3VLConfig, load=_load_qwen3vl, features=("last_hidden", "deepstack"), video="qwen3")
# Qwen2.5-VL: RMSNorm blocks, SwiGLU MLP, window attention with full attention in fullatt_block_indexes, patch 14.
QWEN2_5_VL = QwenVLFamily(name="qwen2.5-vl", label="Qwen2.5-VL", model_types=("qwen2_5_vl",),
                          config=Qwen25VLConfig, load=_load_qwen25vl, features=("last_hidden",), video="qwen2")
# Qwen2-VL: LayerNorm blocks, QuickGELU MLP, patch 14.
QWEN2_VL = QwenVLFamily(name="qwen2-vl", label="Qwen2-VL", model_types=("qwen2_vl",),
                        config=Qwen2VLConfig, load=_load_qwen2vl, features=("last_hidden",), video="qwen2")
