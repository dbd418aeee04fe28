"""Qwen3-VL checkpoint folders (the tower is vitcore/qwen3vl.py): merger tokens, and on request the
tower's last hidden states and the DeepStack features."""

from vitcore.families.qwenvl import QwenVLFamily

FAMILY = QwenVLFamily(
    name="qwen3-vl", label="Qwen3-VL", model_types=("qwen3_vl", "qwen3_vl_moe"),
    tower={"module": "vitcore.qwen3vl", "load": "load_qwen3vl", "config": "Qwen3VLConfig"},
    widths=("hidden_size", "out_hidden_size"), features=("last_hidden", "deepstack"),
)
