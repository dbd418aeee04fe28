"""The allowed values of the options that the command line and the library share.

One source of truth: the CLI builds its choice enums from these tuples and the library checks
against them, so the two cannot drift. Torch-free (no torch, numpy or h5py) so that importing it
from the CLI keeps ``vit-extract --help`` instant.
"""

POOLING_MODES = ("none", "mean", "max", "model")  # model: the encoder's own pooled embedding
RESIZE_MODES = ("squash", "crop", "pad")
DECODE_MODES = ("draft", "full", "gpu")
# Qwen-VL: which of transformers' two image-processor backends the pixels follow (its backend= names)
PROCESSOR_BACKENDS = ("torchvision", "pil")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # compute dtype; auto picks per device
OUT_DTYPES = ("float16", "float32", "bfloat16")  # stored dtype (bfloat16: read as ml_dtypes.bfloat16)
COMPILE_MODES = ("auto", "on", "off")  # torch.compile: auto = where measured to pay (run/compile_choice.py)
COMPRESSIONS = ("none", "gzip", "lz4", "zstd")  # of the stored arrays (lz4, zstd: hdf5plugin)
