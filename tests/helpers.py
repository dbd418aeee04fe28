"""Helpers the test files share (fixtures stay in conftest.py): the sample photos, a tiny encoder
spec, and a tiny random Qwen3-VL checkpoint saved by transformers itself."""

from __future__ import annotations

from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
TINY = "dim=32,depth=2,heads=2,image_size=56"  # 4 × 4 = 16 tokens: fast on any CPU

QWEN3VL_VISION = dict(depth=3, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=48, patch_size=16,
                      temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304,
                      deepstack_visual_indexes=[0, 1, 2], hidden_act="gelu_pytorch_tanh")
QWEN3VL_TEXT = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=24, vocab_size=4096,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 4, 4]})
QWEN3VL_PROCESSOR = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def qwen3vl_processor(min_pixels=65536, max_pixels=16777216):
    import transformers

    return transformers.Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                                                 **QWEN3VL_PROCESSOR)


def save_tiny_qwen3vl(folder: Path):
    """A tiny random Qwen3-VL saved as a real checkpoint (sharded, with an index file) → its vision tower."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3VLConfig(vision_config=QWEN3VL_VISION, text_config=QWEN3VL_TEXT)
    model = transformers.Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # visible biases and norms, so every parameter matters
        for p in model.model.visual.parameters():
            p.add_(torch.randn(p.shape) * 0.02)
    model.save_pretrained(folder, max_shard_size="200KB")
    qwen3vl_processor(max_pixels=200_000).save_pretrained(folder)
    return model.model.visual
