"""ViT-family models defined by timm (DINOv2, EVA, SigLIP and plain ViT in timm): `--model timm:NAME
--weights FILE`. The model is timm's own, made by timm.create_model and loaded by timm's pretrained
loader from the local file (its checkpoint filter included, so an original-format file loads as timm
loads it); the preprocessing is timm's own eval transform from the model's pretrained data config.

Stored: ``forward_features`` (prefix tokens first: CLS, registers), ``forward_intermediates`` after
block K for --layer K, and for --pool model ``forward_head(…, pre_logits=True)``: the model's own
pooling (CLS token, average, or SigLIP's attention-pool head).

timm (and torch) are imported only inside check(), record(), build() and rebuild(); `vit-extract
--help`, `models`, `info` and the readers never load them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vitcore.encoders.base import BuiltEncoder, Encoded, RunRecord, WeightsInfo, describe_prefix, distinct_layers
from vitcore.errors import UsageError, VitExtractError, WeightsError
from vitcore.imaging.decode import decode_rgb
from vitcore.options import EncoderOptions
from vitcore.store.schema import ArraySpec

PREFIX = "timm:"
EXTRA = "pip install 'vit-extract[timm]'"


def _name(model) -> str | None:
    """NAME of --model timm:NAME, or None for any other --model."""
    if isinstance(model, str) and model.strip().lower().startswith(PREFIX):
        return model.strip()[len(PREFIX):].strip()
    return None


def _known_to_timm(name: str):
    """timm itself (imported here: it brings torch), once it is known to have a model of ``name``."""
    timm = _timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        raise UsageError(f"timm has no model {name!r}" + (f"; close: {', '.join(close)}" if close else
                                                            "; timm.list_models() lists them"))
    return timm


def _timm():
    try:
        import timm
        import timm.data  # noqa: F401  (the data config and transforms)
    except ImportError as err:
        raise UsageError(f"--model timm:NAME needs timm, which is not installed ({err}): {EXTRA}") from None
    return timm


@dataclass(frozen=True)
class TimmImageLoader:
    """Worker side: decode → upright RGB → timm's eval transforms up to the tensor conversion (its
    resize and crop, on the Pillow image as timm does them) → uint8 (H, W, 3)."""

    transforms: tuple  # timm's torchvision transforms that act on the Pillow image
    size: tuple[int, int]  # (height, width) of the model's input
    decode: str = "full"

    def load(self, source) -> tuple[np.ndarray, tuple[int, int]]:
        rgb, (width, height) = decode_rgb(source, self.decode, lambda w, h: self.size[::-1])
        for transform in self.transforms:
            rgb = transform(rgb)
        return np.array(rgb, dtype=np.uint8), (width, height)


class TimmFamily:
    name = "timm"
    label = "timm"
    summary = ("a ViT-family model defined by timm (DINOv2, EVA, SigLIP, plain ViT): --model timm:NAME --weights FILE "
               f"(.safetensors, .pth or .bin; needs {EXTRA}); timm's own eval preprocessing")
    compilable = False
    takes_video = False
    feeds_language_model = False
    record_without_torch = False  # timm makes the model on the meta device for its shapes (weights_record needs no torch)

    def claims(self, model, weights) -> bool:
        return _name(model) is not None

    def check(self, opts) -> None:
        name = _name(opts.model)
        if not name:
            raise UsageError("--model timm:NAME needs a model name after timm:, e.g. timm:vit_small_patch14_dinov2")
        if not opts.weights or not os.path.isfile(opts.weights):
            raise UsageError(f"--model timm:{name} needs --weights FILE: the model's weights (.safetensors, .pth or .bin)")
        refused = (("--project-dim", opts.project_dim, "the seed encoders"), ("--features", opts.features, "the Qwen-VL families"),
                   ("--resize", opts.resize != "squash", "the seed encoders; timm's data config decides"),
                   ("--resolution", opts.resolution != "native", "the Qwen-VL families; timm's data config decides"),
                   ("--processor", opts.processor, "the transformers-processed families; timm has its own transforms"))
        for flag, given, whose in refused:
            if given:
                raise UsageError(f"{flag} is for {whose} (timm:{name} stores forward_features, --layer K its blocks)")
        if opts.decode == "gpu":
            raise UsageError(f"--decode gpu works with the seed encoders; timm:{name} decodes on the CPU as timm does (--decode full)")
        if importlib.util.find_spec("timm") is None:
            raise UsageError(f"--model timm:NAME needs timm, which is not installed: {EXTRA}")
        # Whether timm knows the name is asked in record(): timm imports torch, and a refusal here must not.

    def weights_record(self, opts) -> WeightsInfo:
        """The weights file's identity, torch-free (a --resume of other weights is refused before torch loads)."""
        from vitcore.encoders.checkpoint_files import file_digest
        from vitcore.system.cache import cached_digest

        digest = cached_digest("file", [opts.weights], lambda: file_digest(opts.weights))  # remembered while unchanged
        return WeightsInfo(source="file", path=os.path.abspath(opts.weights), sha256=digest)

    def record(self, opts, device):
        """timm's model made on the meta device (no weights, no memory) for its shapes and data
        config; the weights file hashed."""
        import torch

        name = _name(opts.model)
        timm = _known_to_timm(name)
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0)
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "num_prefix_tokens"):
            raise UsageError(f"timm:{name} is a {type(model).__name__}, not a ViT-family model (vit-extract takes "
                             "timm models with prefix tokens and forward_intermediates: ViT, DINOv2, EVA, SigLIP)")
        config = timm.data.resolve_model_data_config(model)
        transform = timm.data.create_transform(**config)
        on_image, mean, std = _split(transform.transforms, name)
        _, height, width = config["input_size"]
        layers = distinct_layers(opts.layers, len(model.blocks))
        prefix = int(model.num_prefix_tokens)
        kept = 0 if opts.drop_prefix else prefix
        with torch.device("meta"):  # the shapes timm gives, without computing anything
            try:
                features = model.forward_features(torch.empty(1, 3, height, width))
            except (RuntimeError, AssertionError, ValueError) as err:
                raise WeightsError(f"timm:{name} does not take its data config's {height}×{width} input: {err}") from None
            pooled = model.forward_head(features, pre_logits=True)
        tokens, dim = features.shape[1] - prefix + kept, features.shape[2]
        patches = tokens - kept
        grid = getattr(model.patch_embed, "grid_size", None) or (int(patches ** 0.5),) * 2
        encoder_record = {"family": self.name, "model": name, "class": type(model).__name__, "embed_dim": dim,
                          "depth": len(model.blocks), "prefix_tokens": kept, "prefix_tokens_dropped": prefix - kept,
                          "grid": list(grid), "global_pool": str(getattr(model, "global_pool", "")),
                          "embedding": {"output": "forward_head(pre_logits=True)", "width": int(pooled.shape[-1])}}
        preprocessing = {"data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
                         "transforms": [repr(t) for t in transform.transforms], "decode": opts.decode or "full"}
        weights = self.weights_record(opts)
        outputs = (ArraySpec("tokens", (tokens, dim)), *(ArraySpec(f"layers/{k}", (tokens, dim)) for k in layers))
        return RunRecord(name=f"timm:{name}", encoder_record=json.dumps(encoder_record, sort_keys=True),
                         preprocessing=json.dumps(preprocessing, sort_keys=True), weights=weights, outputs=outputs,
                         width=dim, embedding_width=int(pooled.shape[-1]),
                         parts={"name": name, "layers": layers, "drop": prefix - kept, "prefix": prefix,
                                "loader": TimmImageLoader(tuple(on_image), (height, width), opts.decode or "full"),
                                "mean": mean, "std": std})

    def build(self, opts, device, dtype, record=None):
        import torch

        timm = _timm()
        record = record or self.record(opts, device)
        p = record.parts
        overlay = {"file": os.path.abspath(opts.weights)}
        if not opts.weights.endswith(".npz"):
            overlay["custom_load"] = False  # a .npz is read by the model's own loader; other files as state dicts
        report = _LoadReport()
        try:
            with report.listening():
                model = timm.create_model(p["name"], pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0)
        except Exception as err:  # timm's loader and the readers it calls raise their own kinds
            lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
            detail = next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                          lines[0])
            raise WeightsError(f"timm cannot load {opts.weights} into {p['name']}: {detail[:300]}") from None
        if report.missing or report.unexpected:  # timm loads loosely once the head is dropped: we do not
            raise WeightsError(f"{opts.weights} does not hold a whole timm:{p['name']}: missing {report.missing[:4]}, "
                               f"unexpected {report.unexpected[:4]} (a file for another model?)")
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        layers, drop, prefix = p["layers"], p["drop"], p["prefix"]
        mean = torch.tensor(p["mean"], dtype=torch.float32, device=device)[:, None, None]
        std = torch.tensor(p["std"], dtype=torch.float32, device=device)[:, None, None]

        def encode(pixels):
            # timm's ToTensor and Normalize, in their order: uint8 → /255 → (x − mean) / std, float32
            x = ((pixels.permute(0, 3, 1, 2).float().div(255) - mean) / std).to(dtype)  # (B, 3, H, W)
            if layers:
                features, hidden = model.forward_intermediates(
                    x, indices=list(layers), norm=False, output_fmt="NLC", return_prefix_tokens=prefix > 0)
            else:
                features, hidden = model.forward_features(x), []
            arrays = {"tokens": features[:, drop:]}  # (B, T, D), prefix tokens first
            for k, h in zip(layers, hidden):
                h = torch.cat([h[1], h[0]], dim=1) if prefix > 0 else h  # (prefix, patches) → one sequence
                arrays[f"layers/{k}"] = h[:, drop:]
            arrays["embedding"] = model.forward_head(features, pre_logits=True)  # (B, E)
            return Encoded(arrays)

        return BuiltEncoder.of(record, encode=encode, loader=p["loader"],
                               default_batch_size=lambda: 16 if device.type == "cpu" else 64)

    def rebuild(self, settings: dict, file: str):
        enc, weights = settings["encoder"], settings["weights"]
        path = weights.get("path")
        if not path or not os.path.isfile(path):
            raise VitExtractError(f"the weights {path} recorded in {file} are gone; cannot encode a new image")
        return EncoderOptions(model=f"timm:{enc['model']}", weights=path,
                              decode=settings["preprocessing"].get("decode", "full"),
                              drop_prefix=bool(enc.get("prefix_tokens_dropped")))

    def describe(self, settings: dict) -> dict:
        enc, prep = settings["encoder"], settings["preprocessing"]
        config = prep["data_config"]
        prefix = describe_prefix(enc)
        return {
            "encoder": f"timm {enc['model']} ({enc['class']}): dim {enc['embed_dim']}, depth {enc['depth']}, {prefix}, "
                       f"pooled embedding {enc['global_pool'] or 'head'} ({enc['embedding']['width']})",
            "preprocessing": f"timm eval transform: input {config['input_size'][1]}×{config['input_size'][2]}, "
                             f"crop_pct {config.get('crop_pct')} ({config.get('crop_mode')}), "
                             f"{config.get('interpolation')} (Pillow), decode {prep.get('decode')}",
        }

    def framed(self, picture, preprocessing: dict):
        """A picture as the model saw it: timm's centre mode (shortest edge to input / crop_pct, then
        the centred input window, its offset rounded as torchvision rounds it); other modes whole."""
        config = preprocessing["data_config"]
        if config.get("crop_mode", "center") != "center":
            return picture
        _, height, width = config["input_size"]
        scale = math.floor(min(height, width) / config.get("crop_pct", 1.0))
        short, long = sorted((picture.width, picture.height))
        new_long = int(scale * long / short)
        size = (scale, new_long) if picture.width <= picture.height else (new_long, scale)
        shown = picture.resize(size, Image.Resampling.BICUBIC)
        top, left = int(round((size[1] - height) / 2.0)), int(round((size[0] - width) / 2.0))
        return shown.crop((left, top, left + width, top + height))

    def token_grid(self, encoder: dict, grid_thw) -> tuple[int, int]:
        return tuple(encoder["grid"])

    def prefix_tokens(self, encoder: dict) -> int:
        return int(encoder.get("prefix_tokens", 0))

    def deepstack_levels(self, encoder: dict) -> int:
        return 0


class _LoadReport(logging.Handler):
    """What timm's pretrained loader reports (it loads without strictness when the classifier is
    dropped, and lists the tensors it could not place in its log): collected, not printed."""

    LOGGER = "timm.models._builder"

    def __init__(self):
        super().__init__(logging.INFO)
        self.missing: list[str] = []
        self.unexpected: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        keys = text[text.find("(") + 1:text.find(")")].split(", ") if "(" in text else []
        if text.startswith("Missing keys"):
            self.missing += keys
        elif text.startswith("Unexpected keys"):
            self.unexpected += keys

    @contextlib.contextmanager
    def listening(self):
        logger = logging.getLogger(self.LOGGER)
        level, propagate = logger.level, logger.propagate
        logger.addHandler(self)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the report is ours to give, in one line
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)
            logger.propagate = propagate


def _split(transforms, name: str):
    """timm's eval transforms → (those acting on the Pillow image, mean, std): the tail must be its
    tensor conversion and normalisation, which run on the device."""
    kinds = [type(t).__name__ for t in transforms]
    if len(kinds) < 2 or kinds[-2] not in ("ToTensor", "MaybeToTensor") or kinds[-1] not in ("Normalize", "MaybeNormalize"):
        raise UsageError(f"timm:{name}'s eval transform is {', '.join(kinds)}; vit-extract follows transforms that end "
                         "in ToTensor and Normalize")
    normalize = transforms[-1]
    return transforms[:-2], tuple(float(v) for v in normalize.mean), tuple(float(v) for v in normalize.std)


TIMM = TimmFamily()
