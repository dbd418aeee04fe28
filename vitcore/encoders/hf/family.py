"""The towers transformers defines: SigLIP, SigLIP2 (NaFlex), CLIP and DINOv2 (with or without
registers), from a local Hugging Face checkpoint folder (the hub cache's snapshot folders included).
One class, with each family's own values at the end (SIGLIP, SIGLIP2, CLIP, DINOV2); the tower is
the library's own class (tower.py), the image processor its settings applied as either backend
does (processor.py), the folder's files read by checkpoint.py.

Tokens are stored as the library returns them: ``last_hidden_state`` (and ``hidden_states`` after
block K for --layer K), prefix tokens (CLS, registers) first unless --drop-prefix; the encoder
record says how many there are. --pool model stores the model's own pooled embedding (CLIP's
projected image embedding, SigLIP's attention-pool head, DINOv2's normalised CLS token).

Torch (and transformers) are imported only inside record(), build() and rebuild(), so
`vit-extract --help`, `models`, `info` and the readers never load them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, replace
from typing import Callable

from vitcore.encoders.base import BuiltEncoder, Encoded, RunRecord, WeightsInfo, describe_prefix, distinct_layers
from vitcore.encoders.hf.checkpoint import model_type
from vitcore.errors import UsageError, VitExtractError
from vitcore.options import EncoderOptions
from vitcore.store.schema import ArraySpec, processor_backend

PREPROCESSING_KEYS = ("processor", "resize_rule", "mean", "std", "rescale_factor", "height", "width", "shortest_edge",
                      "crop_height", "crop_width", "patch_size", "max_num_patches", "interpolation")


@dataclass(frozen=True)
class Tower:
    """One model type: how its checkpoint is laid out and what its tower returns."""

    two_tower: bool  # a CLIPModel / SiglipModel folder: the vision config is nested, a text tower sits beside it
    processor: str  # the image processor class transformers picks when the JSON names none
    tower_class: Callable[[str], str]  # folder → the transformers class that holds its vision tower
    prefix: Callable[[object], int]  # vision config → prefix tokens (CLS, registers) before the patch tokens
    embedding: Callable[[object, str], tuple[str, int] | None]  # (config, class) → (output field, width) or None
    any_size: bool = False  # the tower interpolates its position table to any input (DINOv2); else image_size only


class TransformersTowerFamily:
    compilable = False
    takes_video = False
    feeds_language_model = False  # tokens for retrieval and probing; a VLM's projector is not part of these towers
    record_without_torch = False  # transformers' config classes read the checkpoint (weights_record needs no torch)

    def __init__(self, name: str, label: str, towers: dict[str, Tower], naflex: bool = False):
        self.name, self.label, self.towers, self.naflex = name, label, towers, naflex
        self.model_types = tuple(towers)
        self.summary = (f"the vision tower of a local transformers {label} checkpoint folder or hub cache folder "
                        f"(--weights DIR, told by config.json model_type {' or '.join(towers)}; needs transformers: "
                        "pip install 'vit-extract[transformers]')")

    # -- what a run takes ------------------------------------------------------------------
    def claims(self, model, weights) -> bool:
        if model is not None or not weights or not os.path.isdir(weights):
            return False
        return model_type(weights) in self.towers

    def check(self, opts) -> None:
        name = self.name
        if not opts.weights or not os.path.isdir(opts.weights):
            raise UsageError(f"--model {name} needs --weights DIR: a local transformers {self.label} checkpoint folder")
        found = model_type(opts.weights)
        if found is not None and found not in self.towers:
            raise UsageError(f"--model {name}: {opts.weights} holds a {found!r} checkpoint, not "
                             f"{' or '.join(self.towers)}; drop --model to have it recognised")
        refused = (("--project-dim", opts.project_dim, "the seed encoders"),
                   ("--features", opts.features, "the Qwen-VL families"),
                   ("--resize", opts.resize != "squash", "the seed encoders; this checkpoint's image processor decides"),
                   ("--resolution", opts.resolution != "native", "the Qwen-VL families; this checkpoint's image "
                                                                   "processor decides"))
        for flag, given, whose in refused:
            if given:
                raise UsageError(f"{flag} is for {whose} ({name} stores its tower's tokens, --layer K its hidden states)")
        if opts.decode == "gpu":
            raise UsageError(f"--decode gpu works with the seed encoders; {name} decodes on the CPU exactly as its "
                             "processor does (--decode full)")
        if importlib.util.find_spec("transformers") is None:
            raise UsageError(f"{opts.weights} is a {self.label} checkpoint, whose tower transformers defines, and "
                             "transformers is not installed: pip install 'vit-extract[transformers]'")

    def weights_record(self, opts) -> WeightsInfo:
        """The checkpoint's identity, torch-free (a --resume of other weights is refused before torch loads)."""
        from vitcore.encoders.hf import checkpoint

        spec = self.towers[model_type(opts.weights)]
        return WeightsInfo(source="file", path=os.path.abspath(opts.weights),
                           sha256=checkpoint.weights_sha256(opts.weights, spec.two_tower))

    def record(self, opts, device):
        """From the checkpoint's JSON files (read by transformers' config class) and a hash of its
        vision tensors' bytes (no tower is built)."""
        from vitcore.encoders.hf import checkpoint, tower  # transformers: only once a run is under way
        from vitcore.encoders.pixels import DEFAULT_BACKEND

        folder = opts.weights
        kind = model_type(folder)
        spec = self.towers[kind]
        config = tower.vision_config(folder, spec.two_tower)
        class_name = spec.tower_class(folder)
        prep = checkpoint.image_processor(folder, kind, spec.processor, opts.processor or DEFAULT_BACKEND)
        patch, width = config.patch_size, config.hidden_size
        layers = distinct_layers(opts.layers, config.num_hidden_layers)
        prefix = spec.prefix(config)
        kept = 0 if opts.drop_prefix else prefix
        notes = [f"--drop-prefix: {self.label}'s tokens have no prefix tokens; nothing was dropped"] \
            if opts.drop_prefix and not prefix else []
        embedding = spec.embedding(config, class_name)
        grid = None
        if self.naflex:
            outputs = [ArraySpec("tokens", (width,), ragged=True),
                       *(ArraySpec(f"layers/{k}", (width,), ragged=True) for k in layers)]
            if prep.patch_size != patch:
                raise VitExtractError(f"{folder}: the image processor's patch_size is {prep.patch_size} but the "
                                      f"vision config's is {patch}; the processor does not fit this checkpoint")
        else:
            height, width_px = prep.output_size
            grid = (height // patch, width_px // patch)
            expected = getattr(config, "image_size", None)
            if not spec.any_size and expected is not None and (height, width_px) != (expected, expected):
                raise VitExtractError(f"{folder}: the image processor makes {height}×{width_px} pictures but the "
                                      f"{class_name} takes {expected}×{expected} (transformers refuses them too)")
            tokens = kept + grid[0] * grid[1]
            outputs = [ArraySpec("tokens", (tokens, width)), *(ArraySpec(f"layers/{k}", (tokens, width)) for k in layers)]
        decode = opts.decode or "full"
        encoder_record = {"family": self.name, "model_type": kind, "class": class_name,
                          "config": tower.config_record(config), "prefix_tokens": kept,
                          "prefix_tokens_dropped": prefix - kept, "grid": list(grid) if grid else None,
                          "embedding": embedding and {"output": embedding[0], "width": embedding[1]}}
        weights = self.weights_record(opts)
        return RunRecord(name=self.name, encoder_record=json.dumps(encoder_record, sort_keys=True),
                         preprocessing=json.dumps({**prep.to_record(), "decode": decode}, sort_keys=True),
                         weights=weights, outputs=tuple(outputs), grid_thw=self.naflex, width=width, notes=notes,
                         embedding_width=embedding and embedding[1],
                         no_embedding="" if embedding else "its vision config has vision_use_head false: no pooling head",
                         parts={"config": config, "class": class_name, "preprocess": prep, "decode": decode,
                                "layers": layers, "drop": prefix - kept, "embedding": embedding and embedding[0]},
                         token_counts=self._token_counts(prep, patch, outputs) if self.naflex else None)

    @staticmethod
    def _token_counts(prep, patch: int, outputs):
        """NaFlex: a picture's patches at the size it is resized to (no prefix tokens)."""
        def counts(width: int, height: int) -> dict[str, int]:
            h, w = prep.resized_size(height, width)
            return {o.name: (h // patch) * (w // patch) for o in outputs}
        return counts

    def build(self, opts, device, dtype, record=None):
        from vitcore.encoders.hf import tower
        from vitcore.encoders.hf.processor import HFImageLoader

        record = record or self.record(opts, device)
        p = record.parts
        model = tower.load_tower(opts.weights, p["class"], p["config"], device, dtype)
        forward = (_naflex_forward if self.naflex else _fixed_forward)(model, p, dtype)
        return BuiltEncoder.of(record, encode=forward, loader=HFImageLoader(p["preprocess"], decode=p["decode"]),
                               default_batch_size=lambda: 16 if device.type == "cpu" else 64)

    # -- what a finished file needs ------------------------------------------------------------
    def rebuild(self, settings: dict, file: str):
        from vitcore.encoders.hf import checkpoint  # only once a run is under way

        folder, enc, prep = settings["weights"]["path"], settings["encoder"], settings["preprocessing"]
        if not folder or not os.path.isdir(folder):
            raise VitExtractError(f"the checkpoint {folder} recorded in {file} is gone; cannot encode a new image")
        backend = processor_backend(prep)
        spec = self.towers[enc["model_type"]]
        now = checkpoint.image_processor(folder, enc["model_type"], spec.processor, backend).to_record()
        changed = [k for k in PREPROCESSING_KEYS if _plain(now.get(k)) != _plain(prep.get(k))]
        if changed:
            raise VitExtractError(f"the image processor of {folder} has changed since {file} was made "
                                  f"({', '.join(changed)}); cannot encode a new image as its rows were")
        return EncoderOptions(model=self.name, weights=folder, decode=prep.get("decode", "full"), processor=backend,
                              drop_prefix=bool(enc.get("prefix_tokens_dropped")))

    def describe(self, settings: dict) -> dict:
        enc, prep = settings["encoder"], settings["preprocessing"]
        cfg = enc["config"]
        prefix = describe_prefix(enc)
        pooled = enc.get("embedding")
        if prep["resize_rule"] == "max_patches":
            size = f"NaFlex: at most {prep['max_num_patches']} patches of {prep['patch_size']}, aspect ratio kept"
        elif prep["resize_rule"] == "shortest_edge":
            size = f"shortest edge to {prep['shortest_edge']}"
        else:
            size = f"resize to {prep['height']}×{prep['width']}"
        if prep.get("crop_height"):
            size += f", centre crop {prep['crop_height']}×{prep['crop_width']}"
        return {
            "encoder": f"{self.label} {enc['class']}: hidden {cfg['hidden_size']}, depth {cfg['num_hidden_layers']}, "
                       f"heads {cfg['num_attention_heads']}, patch {cfg['patch_size']}, {prefix}"
                       + (f", pooled embedding {pooled['output']} ({pooled['width']})" if pooled else ""),
            "preprocessing": f"{prep['processor']} ({processor_backend(prep)} backend): {size}, "
                             f"{prep['interpolation']}, decode {prep['decode']}",
        }

    def framed(self, picture, preprocessing: dict):
        """A picture as the tower saw it: squashed to the processor's size, or its centre crop."""
        from PIL import Image

        from vitcore.encoders.hf.processor import HFPreprocess

        prep = HFPreprocess(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in preprocessing.items()
                               if k in HFPreprocess.__dataclass_fields__}, resample=3)
        if prep.resize_rule == "max_patches":
            return picture
        height, width = prep.resized_size(picture.height, picture.width)
        shown = picture.resize((width, height), Image.Resampling.BICUBIC)
        if prep.crop_height is None:
            return shown
        top, left = (height - prep.crop_height) // 2, (width - prep.crop_width) // 2
        return shown.crop((left, top, left + prep.crop_width, top + prep.crop_height))

    def token_grid(self, encoder: dict, grid_thw) -> tuple[int, int]:
        """Patch tokens in raster order (after the prefix tokens, see prefix_tokens)."""
        if grid_thw is not None:
            return int(grid_thw[1]), int(grid_thw[2])
        return tuple(encoder["grid"])

    def prefix_tokens(self, encoder: dict) -> int:
        return int(encoder.get("prefix_tokens", 0))

    def deepstack_levels(self, encoder: dict) -> int:
        return 0


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _hidden_index(k: int) -> int:
    """--layer K (blocks counted from 0, negative from the end) → its index in hidden_states, whose
    entry 0 is the embeddings: after block K is hidden_states[K + 1]; -2 is hidden_states[-2]."""
    return k + 1 if k >= 0 else k


def _fixed_forward(model, parts: dict, dtype):
    """The encode() of a fixed-size tower: uint8 (B, H, W, 3) → Encoded with (B, T, D) arrays."""
    from vitcore.encoders.hf.processor import normalize

    prep, layers, drop, embedding = parts["preprocess"], parts["layers"], parts["drop"], parts["embedding"]

    def encode(pixels):
        x = normalize(pixels, prep).to(dtype)  # (B, 3, H, W)
        out = model(pixel_values=x, output_hidden_states=bool(layers))
        arrays = {"tokens": out.last_hidden_state[:, drop:]}  # (B, T, D)
        for k in layers:
            arrays[f"layers/{k}"] = out.hidden_states[_hidden_index(k)][:, drop:]
        if embedding:
            arrays["embedding"] = getattr(out, embedding)  # (B, E)
        return Encoded(arrays)

    return encode


def _naflex_forward(model, parts: dict, dtype):
    """The encode() of SigLIP2 NaFlex: uint8 pictures (H_i, W_i, 3) → patches padded to the batch's
    longest, with the attention mask and each picture's patch grid → ragged (Σ T_i, D) arrays."""
    import torch

    from vitcore.encoders.hf.processor import naflex_patches

    prep, layers, embedding = parts["preprocess"], parts["layers"], parts["embedding"]

    def encode(pictures):
        patched = [naflex_patches(p, prep) for p in pictures]  # [(h·w, p·p·3), (h, w)]
        counts = [x.shape[0] for x, _ in patched]
        longest, device = max(counts), patched[0][0].device
        values = torch.zeros(len(patched), longest, patched[0][0].shape[1], device=device)
        mask = torch.zeros(len(patched), longest, dtype=torch.long, device=device)
        for i, (x, _) in enumerate(patched):
            values[i, :len(x)], mask[i, :len(x)] = x, 1
        shapes = torch.tensor([grid for _, grid in patched], dtype=torch.long, device=device)  # (B, 2)
        out = model(pixel_values=values.to(dtype), pixel_attention_mask=mask, spatial_shapes=shapes,
                    output_hidden_states=bool(layers))

        def ragged(x):  # (B, longest, D) → (Σ T_i, D), each picture's own patches
            return torch.cat([x[i, :n] for i, n in enumerate(counts)])

        arrays = {"tokens": ragged(out.last_hidden_state)}
        for k in layers:
            arrays[f"layers/{k}"] = ragged(out.hidden_states[_hidden_index(k)])
        if embedding:
            arrays["embedding"] = getattr(out, embedding)  # (B, D)
        return Encoded(arrays, {name: counts for name in arrays if name != "embedding"},
                       [(1, h, w) for _, (h, w) in patched])

    return encode


# -- each family's own values -------------------------------------------------------------------
def _clip_class(folder: str) -> str:
    """CLIPModel and CLIPVisionModelWithProjection folders have the projection to the shared space:
    told by the tensors' names, or for a pytorch_model.bin by the class config.json names."""
    from vitcore.encoders.base import checkpoint_config
    from vitcore.encoders.checkpoint_files import has_safetensors, tensor_names

    if model_type(folder) == "clip":
        return "CLIPVisionModelWithProjection"
    if has_safetensors(folder):
        projected = "visual_projection.weight" in tensor_names(folder)
    else:
        projected = "CLIPVisionModelWithProjection" in ((checkpoint_config(folder) or {}).get("architectures") or [])
    return "CLIPVisionModelWithProjection" if projected else "CLIPVisionModel"


def _clip_embedding(config, class_name: str):
    if class_name == "CLIPVisionModelWithProjection":
        return "image_embeds", config.projection_dim
    return "pooler_output", config.hidden_size


def _head_embedding(config, class_name: str):
    """SigLIP's attention-pool head, where the checkpoint has one."""
    return ("pooler_output", config.hidden_size) if getattr(config, "vision_use_head", True) else None


def _cls_embedding(config, class_name: str):
    return "pooler_output", config.hidden_size


def _fixed(name: str) -> Callable[[str], str]:
    return lambda folder: name


_CLIP = Tower(two_tower=True, processor="CLIPImageProcessor", tower_class=_clip_class, prefix=lambda c: 1,
              embedding=_clip_embedding)
_SIGLIP = Tower(two_tower=True, processor="SiglipImageProcessor", tower_class=_fixed("SiglipVisionModel"),
                prefix=lambda c: 0, embedding=_head_embedding)
_SIGLIP2 = Tower(two_tower=True, processor="Siglip2ImageProcessor", tower_class=_fixed("Siglip2VisionModel"),
                 prefix=lambda c: 0, embedding=_head_embedding)
_DINOV2 = Tower(two_tower=False, processor="BitImageProcessor", tower_class=_fixed("Dinov2Model"),
                prefix=lambda c: 1, embedding=_cls_embedding, any_size=True)
_DINOV2_REGISTERS = replace(_DINOV2, tower_class=_fixed("Dinov2WithRegistersModel"),
                            prefix=lambda c: 1 + c.num_register_tokens)

# SigLIP (and SigLIP2's fixed-resolution checkpoints, which are model_type siglip): tokens without a
# prefix, pooled by the attention-pool head.
SIGLIP = TransformersTowerFamily("siglip", "SigLIP", {"siglip": _SIGLIP, "siglip_vision_model":
                                                      replace(_SIGLIP, two_tower=False)})
# SigLIP2 NaFlex: each picture keeps its aspect ratio within max_num_patches; tokens stored ragged.
SIGLIP2 = TransformersTowerFamily("siglip2", "SigLIP2", {"siglip2": _SIGLIP2, "siglip2_vision_model":
                                                         replace(_SIGLIP2, two_tower=False)}, naflex=True)
# CLIP: CLS first, then the patches; pooled: the projected image embedding (or the normalised CLS).
CLIP = TransformersTowerFamily("clip", "CLIP", {"clip": _CLIP, "clip_vision_model":
                                                replace(_CLIP, two_tower=False)})
# DINOv2: CLS (and registers) first; pooled: the normalised CLS token.
DINOV2 = TransformersTowerFamily("dinov2", "DINOv2", {"dinov2": _DINOV2, "dinov2_with_registers": _DINOV2_REGISTERS})
