"""Qwen2-VL checkpoint folders (the tower is vitcore/qwen2vl.py): LayerNorm blocks, QuickGELU MLP, patch 14."""

from vitcore.families.qwenvl import QwenVLFamily

FAMILY = QwenVLFamily(
    name="qwen2-vl", label="Qwen2-VL", model_types=("qwen2_vl",),
    tower={"module": "vitcore.qwen2vl", "load": "load_qwen2vl", "config": "Qwen2VLConfig"},
    widths=("embed_dim", "hidden_size"), features=("last_hidden",),
)
