"""The seed encoders: config.py (EncoderConfig, presets), model.py (the ViT), weights.py (seeded
init, safetensors), processor.py (resize to S × S, normalisation), gpu_decode.py (--decode gpu),
family.py (what a run asks of them)."""
