"""The seed encoders: presets small | base | large or a custom spec, untrained (seeded) or from a
.safetensors file; fixed S × S input, one token per patch.

Torch is imported only inside record() and build() (through weights.py, model.py, gpu_decode.py),
so `vit-extract --help`, `models`, `info` and the readers never load it.
"""

from __future__ import annotations

import json
import os

from vitcore.encoders.base import BuiltEncoder, Encoded, RunRecord, distinct_layers
from vitcore.encoders.seed.config import PRESETS, EncoderConfig, parameter_count
from vitcore.encoders.seed.processor import ImageLoader, PreprocessConfig, framed, normalize_on_device
from vitcore.errors import UsageError, VitExtractError
from vitcore.options import EncoderOptions
from vitcore.store.schema import ArraySpec


class SeedFamily:
    name = "seed"
    summary = ("the seed encoders: presets small, base, large or a spec like dim=256,depth=4,heads=4; "
               "untrained (seeded) or --weights FILE.safetensors")
    label = "seed"
    compilable = True  # fixed-shape batches: torch.compile specialises on the batch size
    takes_video = False
    feeds_language_model = False  # its tokens go to a language model through place_image_tokens, by hand
    record_without_torch = True  # the config and the weights file's metadata and hash: no tensors

    def claims(self, model, weights) -> bool:
        """Presets, custom specs and configs, untrained or with a weights file (not a folder)."""
        return not (weights is not None and os.path.isdir(weights))

    def check(self, opts) -> None:
        if opts.features:
            raise UsageError(f"--features {','.join(opts.features)} is not taken by the seed encoders "
                             "(they store tokens, and hidden states with --layer)")
        if opts.resolution != "native":
            raise UsageError("--resolution is not taken by the seed encoders: their input size is part of "
                             "the model (image_size in a custom spec); see --resize")
        if opts.processor is not None:
            raise UsageError(f"--processor {opts.processor} is for the families preprocessed by transformers (which of its "
                             "image-processor backends to follow); the seed encoders have their own preprocessing")
        if opts.drop_prefix:
            raise UsageError("--drop-prefix is for towers with prefix tokens (CLIP, DINOv2); the seed encoders store "
                             "patch tokens only")

    def record(self, opts, device):
        """The config from --model / --weights (a weights file is read for its config and hashed,
        not loaded), the layers asked for, and the decode this device will really do."""
        from vitcore.encoders.seed.weights_file import resolve_config, weights_info  # torch-free

        cfg = resolve_config(opts.model, opts.weights, opts.project_dim)
        layers = distinct_layers(opts.layers, cfg.depth)
        prep = PreprocessConfig(image_size=cfg.image_size, resize=opts.resize, decode=opts.decode or "draft")
        notes = []
        if prep.decode == "gpu":
            from vitcore.encoders.seed import gpu_decode  # torch: only where JPEGs may go to the GPU

            reason = gpu_decode.unavailable_reason(device)
            if reason is not None:  # the file records the decode actually used
                notes.append(f"--decode gpu {reason}: JPEGs were decoded on the CPU (draft) instead")
                prep = PreprocessConfig(image_size=prep.image_size, resize=prep.resize, decode="draft")
        outputs = (ArraySpec("tokens", (cfg.num_tokens, cfg.out_dim)),
                   *(ArraySpec(f"layers/{k}", (cfg.num_tokens, cfg.dim)) for k in layers))
        return RunRecord(
            name=cfg.name, encoder_record=json.dumps({**json.loads(cfg.to_json()), "family": self.name}, sort_keys=True),
            preprocessing=prep.to_json(), weights=weights_info(opts.weights, opts.seed), outputs=outputs,
            projector=json.dumps({"dim": cfg.project_dim}) if cfg.project_dim else "null", notes=notes,
            parts={"config": cfg, "layers": layers, "preprocess": prep}, width=cfg.dim,
        )

    def build(self, opts, device, dtype, record=None):
        import torch  # torch: only once a run is under way

        from vitcore.encoders.seed import gpu_decode
        from vitcore.encoders.seed.weights import encoder_for

        record = record or self.record(opts, device)
        cfg, layers, prep = (record.parts[k] for k in ("config", "layers", "preprocess"))
        encoder = encoder_for(cfg, opts.weights, opts.seed, device, dtype)
        finish_batch = gpu_decode.GpuJpegDecoder(prep, device) if prep.decode == "gpu" else None

        def encoding(forward):
            def encode(pixels):
                x = normalize_on_device(pixels, prep.mean, prep.std, dtype)  # (B, S, S, 3) uint8 → (B, 3, S, S)
                tokens, hidden = forward(x, layers)  # (B, N, P), {K: (B, N, D)}
                return Encoded({"tokens": tokens, **{f"layers/{k}": h for k, h in hidden.items()}})
            return encode

        def compiled_encode():
            # torch.compile traces on the first call, for that batch size only (dynamic=False).
            return encoding(torch.compile(encoder.forward_features, dynamic=False))

        def default_batch_size() -> int:
            return auto_batch_size(cfg, device, dtype)

        return BuiltEncoder.of(record, encode=encoding(encoder.forward_features), compiled_encode=compiled_encode,
                               loader=ImageLoader(prep), finish_batch=finish_batch, default_batch_size=default_batch_size)

    def rebuild(self, settings: dict, file: str):
        """Options that build the encoder ``settings`` (a file's attributes) record."""
        record = {k: v for k, v in settings["encoder"].items() if k != "family"}
        weights = settings["weights"]
        path = None
        if weights.get("source") in ("file", "untrained file"):
            path = weights.get("path")
            if not path or not os.path.isfile(path):
                raise VitExtractError(f"the weights {path} recorded in {file} are gone; cannot encode a new image")
        prep = settings["preprocessing"]
        return EncoderOptions(
            model=None if path else EncoderConfig.from_json(json.dumps(record)), weights=path,
            seed=weights.get("seed") or 0, resize=prep["resize"],
            decode="full" if prep["decode"] == "gpu" else prep["decode"],  # one image: exact decode on the CPU
        )

    def describe(self, settings: dict) -> dict:
        enc, prep = settings["encoder"], settings["preprocessing"]
        return {
            "encoder": f"{enc['name']}: dim {enc['dim']}, depth {enc['depth']}, heads {enc['heads']}, "
                       f"patch {enc['patch']}, input {enc['image_size']}"
                       + (f", projector → {enc['project_dim']}" if enc.get("project_dim") else ""),
            "preprocessing": f"resize {prep['resize']} to {prep['image_size']}, decode {prep['decode']}",
        }

    def deepstack_levels(self, encoder: dict) -> int:
        return 0

    def write_untrained(self, model, seed: int, project_dim: int | None, path: str) -> str:
        """A seeded encoder as .safetensors, marked as a random initialisation; its config's name."""
        from safetensors import SafetensorError  # torch, safetensors: only when weights are written

        from vitcore.encoders.seed.weights import build_encoder, save_weights

        encoder, _ = build_encoder(model, seed=seed, project_dim=project_dim)
        try:
            save_weights(encoder, path, untrained_seed=seed)
        except (OSError, SafetensorError) as error:
            raise VitExtractError(f"cannot write {path}: {getattr(error, 'strerror', None) or error}") from None
        return encoder.cfg.name

    def presets(self) -> list[dict]:
        """Each preset's shape, parameters and tokens per image (`vit-extract models`)."""
        return [
            {
                "name": name, "dim": c.dim, "depth": c.depth, "heads": c.heads, "patch": c.patch,
                "image_size": c.image_size, "parameters": parameter_count(c), "tokens_per_image": c.num_tokens,
            }
            for name, c in PRESETS.items()
        ]

    def framed(self, picture, preprocessing: dict):
        """A picture as this encoder saw it (before its resize to S × S): the --resize mode's frame."""
        return framed(picture, preprocessing.get("resize", "squash"))

    def token_grid(self, encoder: dict, grid_thw) -> tuple[int, int]:
        side = encoder["image_size"] // encoder["patch"]
        return side, side

    def prefix_tokens(self, encoder: dict) -> int:
        return 0  # patch tokens only


def auto_batch_size(cfg, device, dtype) -> int:
    """CPU: a batch big enough to keep the matmuls efficient. CUDA: what fits in half the free memory."""
    import torch  # torch: only once a run is under way

    if device.type != "cuda":
        return 16 if dtype == torch.bfloat16 else 8
    free, _ = torch.cuda.mem_get_info(device)
    element = torch.finfo(dtype).bits // 8
    # Peak activation per image: the MLP hidden (4D) plus q, k, v and residual copies, per token.
    per_image = cfg.num_tokens * (int(cfg.mlp_ratio * cfg.dim) + 6 * cfg.dim) * element * 2
    fits = int(free * 0.5 // max(per_image, 1))
    return max(1, min(512, 1 << max(0, fits.bit_length() - 1)))


SEED = SeedFamily()
