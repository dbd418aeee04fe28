"""Helpers the test files share (fixtures stay in conftest.py): the sample photos, a tiny encoder
spec, and a tiny random Qwen3-VL checkpoint saved by transformers itself."""

from __future__ import annotations

import signal
import time
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


# transformers' two image-processor backends for the Qwen-VL families (its backend= names), each the
# reference for vit-extract's --processor of the same name.
BACKENDS = ("pil", "torchvision")


def processor_class(backend: str, name: str = "Qwen2VLImageProcessor"):
    """transformers' image processor class ``name`` of ``backend`` (torchvision's needs torchvision:
    without it the test is skipped, and .ci/run's second pass, which installs it, runs it)."""
    import pytest
    import transformers

    if backend == "torchvision":
        pytest.importorskip("torchvision", reason="transformers' torchvision backend needs torchvision")
        return getattr(transformers, name)
    return getattr(transformers, name + "Pil")


def auto_processor(folder, backend: str, name: str = "Qwen2VLImageProcessor"):
    """AutoImageProcessor for a checkpoint folder with ``backend`` (never the silent fallback to the other)."""
    import transformers

    wanted = processor_class(backend, name)
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder), backend=backend)
    assert type(processor) is wanted, type(processor)
    return processor


def qwen3vl_processor(min_pixels=65536, max_pixels=16777216, backend: str = "pil"):
    return processor_class(backend)(size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                                    **QWEN3VL_PROCESSOR)


def save_tiny_qwen3vl(folder: Path):
    """A tiny random Qwen3-VL saved as a real checkpoint (sharded, with an index file) → its vision tower."""
    import transformers

    config = transformers.Qwen3VLConfig(vision_config=QWEN3VL_VISION, text_config=QWEN3VL_TEXT)
    return _save_tiny(transformers.Qwen3VLForConditionalGeneration, config, 0, folder,
                      qwen3vl_processor(max_pixels=200_000))


def _save_tiny(model_class, config, seed: int, folder: Path, processor):
    """A random model of ``config`` with visible biases and norms (so every vision parameter
    matters), saved sharded with an index beside ``processor`` → its vision tower."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for p in model.model.visual.parameters():
            p.add_(torch.randn(p.shape) * 0.02)
    model.save_pretrained(folder, max_shard_size="200KB")
    processor.save_pretrained(folder)
    return model.model.visual


QWEN2VL_VISION = dict(depth=3, embed_dim=64, hidden_size=48, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")
QWEN25VL_VISION = dict(depth=3, hidden_size=64, out_hidden_size=48, intermediate_size=96, num_heads=4, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, hidden_act="silu", window_size=56,
                       fullatt_block_indexes=[1])  # windows of 2 × 2 merged tokens: several per image


def save_tiny_qwen2vl(folder: Path, version: str = "2"):
    """A tiny random Qwen2-VL (version "2") or Qwen2.5-VL ("2.5") checkpoint, sharded, with the processor
    (Qwen2-VL's values: patch 14, and the class's CLIP mean and std) → its vision tower."""
    import transformers

    if version == "2":
        config = transformers.Qwen2VLConfig(vision_config=QWEN2VL_VISION, text_config=QWEN3VL_TEXT)
        model_class = transformers.Qwen2VLForConditionalGeneration
    else:
        config = transformers.Qwen2_5_VLConfig(vision_config=QWEN25VL_VISION, text_config=QWEN3VL_TEXT)
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    processor = transformers.Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 150_000})
    return _save_tiny(model_class, config, 1, folder, processor)


def resave_single_file(folder: Path, target: Path) -> Path:
    """The checkpoint in one model.safetensors with the tower under visual.* (as saved before transformers
    4.52, and by Qwen*VLModel.save_pretrained), its JSON files beside it."""
    from safetensors.torch import load_file, save_file

    target.mkdir()
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        for name, tensor in load_file(str(shard)).items():
            state[name.replace("model.visual.", "visual.").replace("model.language_model.", "language_model.")] = tensor
    save_file(state, str(target / "model.safetensors"))
    for json_file in folder.glob("*.json"):
        if json_file.name != "model.safetensors.index.json":
            (target / json_file.name).write_bytes(json_file.read_bytes())
    return target


TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)


def _visible_hf(model, seed: int):
    """Biases and norms made visible (random init leaves many at 0 or 1), so each parameter matters."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    return model.eval()


def _save(folder, model, processor):
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# Tiny random checkpoints of the towers transformers defines, saved by transformers itself (with the
# Pillow class of their image processor, which saves the same JSON as the torchvision one).
def _clip(folder):
    import transformers as t

    config = t.CLIPConfig(text_config=TEXT, vision_config=dict(VISION, image_size=56, patch_size=14), projection_dim=24)
    return _save(folder, _visible_hf(t.CLIPModel(config), 1),
                 t.CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}))


def _clip_vision(folder):
    """A bare CLIPVisionModel (no projection): pooled is the normalised CLS."""
    import transformers as t

    config = t.CLIPVisionConfig(**VISION, image_size=42, patch_size=14)
    return _save(folder, _visible_hf(t.CLIPVisionModel(config), 2), t.CLIPImageProcessorPil(
        size={"shortest_edge": 48}, crop_size={"height": 42, "width": 42}, resample=2))


def _siglip(folder):
    import transformers as t

    config = t.SiglipConfig(text_config=TEXT, vision_config=dict(VISION, image_size=64, patch_size=16))
    return _save(folder, _visible_hf(t.SiglipModel(config), 3), t.SiglipImageProcessorPil(size={"height": 64, "width": 64}))


def _siglip2(folder):
    import transformers as t

    config = t.Siglip2Config(text_config=TEXT, vision_config=dict(VISION, num_patches=16, patch_size=16))
    return _save(folder, _visible_hf(t.Siglip2Model(config), 4), t.Siglip2ImageProcessorPil(patch_size=16, max_num_patches=24))


def _dinov2(folder):
    import transformers as t

    config = t.Dinov2Config(**VISION, image_size=56, patch_size=14)
    return _save(folder, _visible_hf(t.Dinov2Model(config), 5), t.BitImageProcessorPil(
        size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]))


def _dinov2_registers(folder):
    import transformers as t

    config = t.Dinov2WithRegistersConfig(**VISION, image_size=56, patch_size=14, num_register_tokens=3)
    return _save(folder, _visible_hf(t.Dinov2WithRegistersModel(config), 6), t.BitImageProcessorPil(
        size={"shortest_edge": 70}, crop_size={"height": 42, "width": 56}))


HF_CHECKPOINTS = {  # name → (saver(folder) → folder, family, processor class, prefix tokens)
    "clip": (_clip, "clip", "CLIPImageProcessor", 1),
    "clip_vision_model": (_clip_vision, "clip", "CLIPImageProcessor", 1),
    "siglip": (_siglip, "siglip", "SiglipImageProcessor", 0),
    "siglip2": (_siglip2, "siglip2", "Siglip2ImageProcessor", 0),
    "dinov2": (_dinov2, "dinov2", "BitImageProcessor", 1),
    "dinov2_with_registers": (_dinov2_registers, "dinov2", "BitImageProcessor", 4),
}


def make_clip(path, frames: int, width: int, height: int, fps: int, codec: str = "libx264", options=None) -> str:
    """A clip of smooth colour fields with noise (so resizing and sampling both show), written by PyAV."""
    import av
    import numpy as np

    rng = np.random.default_rng(frames * 7 + width)
    with av.open(str(path), "w", options=options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        ys, xs = np.mgrid[0:height, 0:width]
        for i in range(frames):
            base = np.stack([(xs * 3 + i * 9) % 256, (ys * 2 + i * 5) % 256, (xs + ys + i * 13) % 256], -1)
            picture = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def folder_of_copies(folder: Path, count: int, picture: str = "chelsea.jpg") -> Path:
    """``count`` copies of a sample picture in a new folder (img0000.jpg …): a run long enough to stop."""
    folder.mkdir()
    data = (SAMPLES / picture).read_bytes()
    for i in range(count):
        (folder / f"img{i:04d}.jpg").write_bytes(data)
    return folder


def wait_for_committed(out: Path, rows: int, timeout: float = 60, every: float = 0.1) -> None:
    """Until a run writing ``out`` has committed ``rows`` rows (or the timeout): read without HDF5's
    file lock, which the writer holds."""
    import h5py

    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(every)
        try:
            with h5py.File(out, "r", locking=False) as f:
                if f.attrs["committed"] >= rows:
                    return
        except (OSError, KeyError):
            pass


def sigint_as_default() -> None:
    """preexec_fn for a child a test stops with SIGINT: a test run started in the background (`&`,
    nohup) has SIGINT ignored, the child would inherit that, and a run keeps an inherited ignored
    SIGINT ignored (as the shell meant it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
