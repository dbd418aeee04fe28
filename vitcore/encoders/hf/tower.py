"""A vision tower defined by transformers (CLIPVisionModel[WithProjection], SiglipVisionModel,
Siglip2VisionModel, Dinov2Model, Dinov2WithRegistersModel), loaded from a local checkpoint folder
by the library itself, without network access and without the text tower: the class is the
library's, its weights its own loader's; vit-extract only calls it."""

from __future__ import annotations

import contextlib

from vitcore.errors import WeightsError

# Keys of a vision config that do not change what the tower computes (training settings, the
# library's bookkeeping): left out of the file's encoder record, so a resume under another
# transformers version compares what matters.
NOT_COMPUTED = {"architectures", "dtype", "torch_dtype", "id2label", "label2id", "transformers_version",
                "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward",
                "is_encoder_decoder", "problem_type", "initializer_range", "initializer_factor", "attention_dropout",
                "hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate", "use_cache",
                "tie_word_embeddings", "pruned_heads", "torchscript", "use_bfloat16", "tf_legacy_loss",
                "dropout", "layerdrop"}


@contextlib.contextmanager
def quiet():
    """transformers' load report and progress bars off while a tower loads (vit-extract reports itself)."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def vision_config(folder: str, two_tower: bool):
    """The tower's config as transformers reads it (a two-tower checkpoint's vision_config; CLIP's
    projection width comes from the outer config, where CLIPModel keeps it)."""
    import transformers

    try:
        with quiet():
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # transformers' own kinds too (its strict config validation)
        first = (str(err).splitlines() or [""])[0][:300]
        raise WeightsError(f"{folder}/config.json cannot be read by transformers: {type(err).__name__}: {first}") from None
    if not two_tower:
        return config
    vision = getattr(config, "vision_config", None)
    if vision is None or not hasattr(vision, "hidden_size"):
        raise WeightsError(f"{folder}/config.json has no readable vision_config")
    if hasattr(config, "projection_dim") and hasattr(vision, "projection_dim"):
        vision.projection_dim = config.projection_dim
    return vision


def config_record(config) -> dict:
    """The config values that decide what the tower computes."""
    return {k: v for k, v in config.to_dict().items() if k not in NOT_COMPUTED and not k.startswith("_")}


def load_tower(folder: str, class_name: str, config, device, dtype):
    """The library's tower class with the folder's weights: every tensor it has must come from the
    folder (a missing or misshapen one is refused, never initialised at random)."""
    import transformers

    cls = getattr(transformers, class_name)
    try:
        with quiet():
            model, info = cls.from_pretrained(folder, config=config, local_files_only=True, dtype=dtype,
                                              output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"transformers cannot load {class_name} from {folder}: {str(err).splitlines()[0]}") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise WeightsError(f"{folder} does not hold a whole {class_name}: missing {missing[:4]}, wrong shape {mismatched[:4]}")
    return model.to(device).eval().requires_grad_(False)
