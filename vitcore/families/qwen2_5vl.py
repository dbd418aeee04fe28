"""Qwen2.5-VL checkpoint folders (the tower is vitcore/qwen2vl.py): RMSNorm blocks, SwiGLU MLP, window
attention with full attention in fullatt_block_indexes, patch 14."""

from vitcore.families.qwenvl import QwenVLFamily

FAMILY = QwenVLFamily(
    name="qwen2.5-vl", label="Qwen2.5-VL", model_types=("qwen2_5_vl",),
    tower={"module": "vitcore.qwen2vl", "load": "load_qwen25vl", "config": "Qwen25VLConfig"},
    widths=("hidden_size", "out_hidden_size"), features=("last_hidden",),
)
