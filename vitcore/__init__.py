"""vit-extract's library: everything the command line does is callable from here.

    import vitcore
    result = vitcore.extract("photos/", "tokens.h5", model="small", pool="mean", progress=True)
    with vitcore.open_tokens("tokens.h5") as f:
        first = f[0]                      # (T, D) or (D,) numpy array
    encoder, weights = vitcore.build_encoder("base")

Attributes are imported on first use, so ``import vitcore`` (and ``vit-extract --help``) stays
fast and does not load torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.7.0"  # 0.7.0: video clips for the Qwen-VL families (--fps, --max-frames, meta/video, video_timing), --compile auto|on|off; 0.6.0: --out-dtype bfloat16, --compression, run --dry-run, vit-extract index; 0.5.0: SigLIP, SigLIP2, CLIP, DINOv2 and timm towers, --pool model, --drop-prefix; 0.4.0: --processor, meta_absent masks, merge copies, compressed tars; 0.3.0: packages by concern, cli installed as vitcore.cli; 0.2.0: every encoder record names its family

_EXPORTS = {  # name → the module that defines it
    "extract": "vitcore.run.pipeline",
    "ExtractOptions": "vitcore.options",
    "ExtractResult": "vitcore.run.pipeline",
    "Progress": "vitcore.run.pipeline",
    "build_encoder": "vitcore.encoders.seed.weights",
    "save_weights": "vitcore.encoders.seed.weights",
    "open_tokens": "vitcore.consumers.tokens",
    "TokenFile": "vitcore.consumers.tokens",
    "EncoderConfig": "vitcore.encoders.seed.config",
    "PRESETS": "vitcore.encoders.seed.config",
    "VisionEncoder": "vitcore.encoders.seed.model",
    "discover": "vitcore.inputs.discover",
    "unescape_key": "vitcore.inputs.base",
    "VitExtractError": "vitcore.errors",
    "TokenDataset": "vitcore.consumers.dataset",
    "collate_tokens": "vitcore.consumers.dataset",
    "encoder_outputs": "vitcore.consumers.lm_inputs",
    "encoder_outputs_from_batch": "vitcore.consumers.lm_inputs",
    "place_image_tokens": "vitcore.consumers.lm_inputs",
    "vllm_image_embeds": "vitcore.consumers.lm_inputs",
    "vllm_video_embeds": "vitcore.consumers.lm_inputs",
    "write_vllm_cache": "vitcore.consumers.vllm_cache",
    "vllm_requests": "vitcore.consumers.vllm_cache",
    "video_timing": "vitcore.consumers.lm_inputs",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vitcore' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names too (imported on first use), for tab completion in IPython and Jupyter."""
    return sorted({*globals(), *__all__})
