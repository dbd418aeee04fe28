"""Stored tokens as the inputs a language model takes in place of pixels.

    outputs, grid = vitcore.encoder_outputs("qwen.h5", keys)       # transformers >= 5.24
    model(input_ids, image_grid_thw=grid, mm_encoder_outputs={"image": outputs})

``outputs`` is what the model's own ``get_image_features`` returns for those images: the merged
tokens per image as ``pooler_output`` and, for Qwen3-VL, the DeepStack features per level and per
image as ``deepstack_features``. Where a model (or a transformers version) has no
``mm_encoder_outputs``, ``place_image_tokens`` writes the tokens into ``inputs_embeds`` at the
image-pad positions exactly as those forwards do (a masked scatter in sequence order); the seed
encoders' projected tokens (``--project-dim``) are placed the same way.

``vllm_image_embeds`` gives vLLM's precomputed-embedding input for the Qwen-VL families (see the
README, "Training and serving on cached tokens"). Clips' rows feed the model the same way, as
``mm_encoder_outputs={"video": outputs}`` with ``video_grid_thw``; ``video_timing`` gives what
goes beside them (Qwen2.5-VL's second_per_grid_ts, Qwen3-VL's prompt timestamps).
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch

from vitcore.consumers.tensors import as_tensor
from vitcore.consumers.tokens import TokenFile, rows_of
from vitcore.encoders import registry
from vitcore.errors import UsageError
from vitcore.store.schema import processor_backend


def _deepstack_levels(names, prefix: str = "") -> list[str]:
    """The names of DeepStack features (``<prefix>deepstack_<j>``) among ``names``, by level j."""
    levels = [name for name in names if name.startswith(f"{prefix}deepstack_")]
    return sorted(levels, key=lambda name: int(name.rpartition("_")[2]))


def encoder_outputs(path: str | os.PathLike, keys=None, dtype: torch.dtype | None = None, device=None):
    """(what ``get_image_features`` returns for the images ``keys`` (all rows by default), in that
    order; their ``image_grid_thw`` (N, 3) int64) for a Qwen-VL file with unpooled tokens.

    A Qwen3-VL file must have been made with ``--features deepstack``: its language model adds
    those features to the first decoder layers, so without them the logits would differ.
    """
    with TokenFile(path) as f:
        family = registry.for_record(f.settings["encoder"])
        if not family.feeds_language_model:
            takers = ", ".join(f.label for f in registry.FAMILIES if f.feeds_language_model)
            raise UsageError(f"{path} was made by the {family.name} encoder; encoder_outputs is for {takers} files "
                             "(for projected seed tokens use place_image_tokens)")
        if f.settings.get("pooling", "none") != "none":
            raise UsageError(f"{path} holds pooled vectors; the language model needs every token (extract with --pool none)")
        stored = [name for name, _, _ in f.settings.get("features") or []]
        levels = _deepstack_levels(stored)
        wanted = family.deepstack_levels(f.settings["encoder"])
        if wanted and len(levels) != wanted:
            raise UsageError(f"{path} has no DeepStack features (made without --features deepstack); the {family.label} "
                             "language model needs them: extract again with --features deepstack")
        rows = rows_of(f, keys)

        def tensor(a: np.ndarray) -> torch.Tensor:
            t = as_tensor(a)
            return t.to(device=device, dtype=dtype or t.dtype)

        tokens = tuple(tensor(f.tokens(r)) for r in rows)  # (T_i, D) each
        deepstack = [tuple(tensor(f.feature(name, r)) for r in rows) for name in levels]
        grids = f.h5["grid_thw"]
        grid = torch.from_numpy(np.asarray([grids[r] for r in rows], np.int64).reshape(-1, 3))
    return _output_record(tokens, deepstack if wanted else None), grid


def video_timing(path: str | os.PathLike, keys=None) -> dict:
    """What a language model takes beside the tokens of the clips ``keys`` (all rows by default):
    ``second_per_grid_ts`` (N,) float32, Qwen2.5-VL's forward argument, and ``timestamps``, per clip
    the seconds of each temporal patch that Qwen3-VL's prompt writes before it ("<0.9 seconds>").

        outputs, grid = vitcore.encoder_outputs("v.h5", keys)
        timing = vitcore.video_timing("v.h5", keys)
        model(input_ids, video_grid_thw=grid, mm_encoder_outputs={"video": outputs},
              second_per_grid_ts=timing["second_per_grid_ts"], ...)
    """
    with TokenFile(path) as f:
        if "meta/video" not in f.h5:
            raise UsageError(f"{path} holds no video clips (made from pictures alone)")
        texts = f.h5["meta/video"]
        records = []
        for row in rows_of(f, keys):
            text = texts[row]
            text = text.decode() if isinstance(text, bytes) else str(text)
            if not text:
                raise UsageError(f"{_text(f.h5['paths'][row])!r} in {path} is a picture, not a clip: it has no video "
                                 "timing (for vLLM: vitcore.vllm_image_embeds)")
            records.append(json.loads(text))
    return {"second_per_grid_ts": torch.tensor([r["second_per_grid_t"] for r in records], dtype=torch.float32),
            "timestamps": [r["timestamps"] for r in records]}


def _output_record(tokens, deepstack):
    """transformers' own output class when it is installed, else an object with the same fields."""
    try:
        from transformers.modeling_outputs import BaseModelOutputWithPooling  # transformers: optional, used where installed

        if deepstack is None:
            return BaseModelOutputWithPooling(pooler_output=tokens)
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        return BaseModelOutputWithDeepstackFeatures(pooler_output=tokens, deepstack_features=deepstack)
    except ImportError:
        return EncoderOutputs(pooler_output=tokens, deepstack_features=deepstack)


class EncoderOutputs:
    """get_image_features' fields, for use without transformers."""

    def __init__(self, pooler_output, deepstack_features=None):
        self.pooler_output = pooler_output
        self.deepstack_features = deepstack_features


def place_image_tokens(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                       tokens) -> torch.Tensor:
    """``inputs_embeds`` (B, L, H) with the image tokens (a (Σ T_i, H) tensor, or a sequence of
    (T_i, H) per image, in prompt order) written at the positions where ``input_ids`` holds
    ``image_token_id``, row by row, left to right: what the Qwen-VL forwards do with their vision
    tower's output. One-line error when the counts differ."""
    tokens = _as_rows(tokens, inputs_embeds.shape[-1])
    mask = input_ids == image_token_id  # (B, L)
    places = int(mask.sum())
    if places != len(tokens) or tokens.shape[-1] != inputs_embeds.shape[-1]:
        raise UsageError(f"the prompt has {places} image-token positions of width {inputs_embeds.shape[-1]}, but "
                         f"{len(tokens)} tokens of width {tokens.shape[-1]} were given")
    out = inputs_embeds.clone()
    out[mask] = tokens.to(out.dtype)
    return out


def _as_rows(tokens, width: int) -> torch.Tensor:
    """Tokens as one (Σ T_i, W) tensor: from a tensor or array (T, W) or (B, T, W) (collate_tokens of
    fixed-size files), or a sequence of those per image."""
    def one(t) -> torch.Tensor:
        t = torch.as_tensor(t)
        return t.reshape(-1, t.shape[-1]) if t.dim() >= 2 else t.reshape(1, -1)

    if torch.is_tensor(tokens) or isinstance(tokens, np.ndarray):
        return one(tokens)
    parts = [one(t) for t in tokens]
    if not parts:
        raise UsageError("no image tokens were given")
    return torch.cat(parts)


def encoder_outputs_from_batch(batch: dict):
    """(outputs, image_grid_thw) for a batch of collate_tokens over a Qwen-VL file: what
    encoder_outputs gives for those rows, to pass as mm_encoder_outputs={"image": outputs}."""
    if "grid_thw" not in batch or "num_tokens" not in batch:
        raise UsageError("this batch is not of a Qwen-VL file (no grid_thw / num_tokens): nothing to feed the model")
    sizes = batch["num_tokens"].tolist()
    tokens = tuple(batch["tokens"].split(sizes))
    levels = _deepstack_levels(batch["features"], prefix="features/")
    deepstack = [tuple(batch["features"][name].split(sizes)) for name in levels] or None
    return _output_record(tokens, deepstack), batch["grid_thw"]


def vllm_image_embeds(path: str | os.PathLike, keys=None, dtype: torch.dtype | None = None) -> dict:
    """vLLM's precomputed-embedding input for the images ``keys`` of a Qwen-VL file:
    ``{"image_embeds": (Σ T_i, D'), "image_grid_thw": (N, 3) int64}``, to pass as
    ``multi_modal_data={"image": …}``. For Qwen3-VL, D' is the merger's width times
    (1 + DeepStack levels): each token's merged output followed by its DeepStack features,
    the layout vLLM's Qwen3-VL model splits again (see the README). Clips: vllm_video_embeds."""
    clips = _clip_rows(path, keys)
    if clips:
        raise UsageError(f"{clips[0]!r} is a video clip: vLLM takes clips as videos (vitcore.vllm_video_embeds), "
                         "not as images")
    tokens, grid = _vllm_embeds(path, keys, dtype)
    return {"image_embeds": tokens, "image_grid_thw": grid}


def vllm_video_embeds(path: str | os.PathLike, keys=None, dtype: torch.dtype | None = None) -> dict:
    """vLLM's precomputed-embedding input for the clips ``keys`` of a Qwen-VL file, to pass as
    ``multi_modal_data={"video": …}``: ``{"video_embeds": (Σ T_i, D'), "video_grid_thw": (N, 3)
    int64}`` laid out as vllm_image_embeds lays out images; for Qwen3-VL also ``"timestamps"``, per
    clip the seconds of each temporal patch (its prompt writes them, so vLLM needs them to size the
    placeholders); for Qwen2.5-VL also ``"second_per_grid_ts"`` (N,) float32, which its M-RoPE
    positions use (left out, vLLM takes 1 s per temporal patch). Checked against vLLM 0.32:
    bench/vllm_check.py."""
    with TokenFile(path) as f:
        family = registry.for_record(f.settings["encoder"]).name
    timing = video_timing(path, keys)  # refuses a picture among the keys
    tokens, grid = _vllm_embeds(path, keys, dtype)
    embeds = {"video_embeds": tokens, "video_grid_thw": grid}
    if family == "qwen3-vl":
        embeds["timestamps"] = timing["timestamps"]
    elif family == "qwen2.5-vl":
        embeds["second_per_grid_ts"] = timing["second_per_grid_ts"]
    return embeds


def _vllm_embeds(path, keys, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(the rows' tokens, each followed by its DeepStack features, concatenated; their grids)."""
    rows, grid = vllm_rows(path, keys, dtype, stacklevel=4)
    return torch.cat(rows), grid


def vllm_rows(path, keys, dtype, stacklevel: int = 3) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(each row's tokens followed by its DeepStack features, (T_i, D'); their grids (N, 3))."""
    outputs, grid = encoder_outputs(path, keys, dtype)
    with TokenFile(path) as f:
        backend = processor_backend(f.settings["preprocessing"])
    if backend != "torchvision":
        warnings.warn(f"{path} was made with --processor {backend}; vLLM makes its own pixels with transformers' "
                      "torchvision processor, so these tokens are not exactly what it would compute from the "
                      "images (extract with --processor torchvision to match)", stacklevel=stacklevel)
    levels = getattr(outputs, "deepstack_features", None) or []
    return [torch.cat([tokens, *[level[i] for level in levels]], dim=-1)
            for i, tokens in enumerate(outputs.pooler_output)], grid


def _clip_rows(path, keys) -> list[str]:
    """The keys among ``keys`` (all rows by default) whose rows are video clips."""
    with TokenFile(path) as f:
        if "meta/video" not in f.h5:
            return []
        texts, names = f.h5["meta/video"], f.h5["paths"]
        return [_text(names[r]) for r in rows_of(f, keys) if texts[r]]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
