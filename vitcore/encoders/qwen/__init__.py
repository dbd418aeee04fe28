"""The Qwen-VL vision towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) from local checkpoint folders:
config.py, checkpoint.py (reading a folder as transformers would), processor.py (the image
processor), layers.py (what the towers share), qwen3vl.py and qwen2vl.py (the towers), family.py
(the three families)."""
