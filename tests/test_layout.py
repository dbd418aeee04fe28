"""The layout the architecture is written in, and the wheel that ships it.

import-linter's contracts (pyproject.toml: one direction through the layers, families that never
import each other, families named only by the registry) are checked over the tree as it installs
(cli/ as vitcore.cli); a deliberately upward import in a scratch module must break them. The wheel
holds every package under vitcore/ and the cli, and nothing else at the top level.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
NOT_SOURCE = shutil.ignore_patterns("__pycache__", "*.pyc")


def _installed_shape(tmp_path: Path) -> Path:
    """vitcore/ with cli/ inside it as vitcore/cli, laid out as the wheel installs them (the import
    graph is read from the folder the package is found in)."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "vitcore", tree / "vitcore", ignore=NOT_SOURCE)
    shutil.copytree(ROOT / "cli", tree / "vitcore" / "cli", ignore=NOT_SOURCE)
    return tree


def _lint(tree: Path) -> subprocess.CompletedProcess:
    # Run in the copy: the working directory comes first on the path, so its vitcore is the one read.
    return subprocess.run([str(LINT_IMPORTS), str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=tree, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_are_kept(tmp_path):
    result = _lint(_installed_shape(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, imports, broken", [
    ("store/upward.py", "from vitcore.run import pipeline", "vitcore.store is not allowed to import vitcore.run"),
    ("inputs/upward.py", "from vitcore.cli import main", "vitcore.inputs is not allowed to import vitcore.cli"),
    ("encoders/seed/peek.py", "from vitcore.encoders.qwen import config", "encoder families never import each other"),
    ("consumers/peek.py", "from vitcore.encoders.seed import processor", "only the registry names the families"),
])
def test_an_arrow_the_wrong_way_breaks_the_contracts(tmp_path, module, imports, broken):
    tree = _installed_shape(tmp_path)
    (tree / "vitcore" / module).write_text(f"def late():\n    {imports}  # even inside a function\n")
    result = _lint(tree)
    assert result.returncode == 1, result.stdout + result.stderr
    assert broken in result.stdout and "BROKEN" in result.stdout


def _source_modules() -> set[str]:
    """Every Python file the tree holds, by the path it installs at (cli/ is vitcore/cli)."""
    found = {str(p.relative_to(ROOT)) for p in (ROOT / "vitcore").rglob("*.py") if "__pycache__" not in p.parts}
    found |= {str(Path("vitcore") / p.relative_to(ROOT)) for p in (ROOT / "cli").rglob("*.py")
              if "__pycache__" not in p.parts}
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built as `pip install .` builds it, from a copy of the tree in which an earlier
    build of another layout left its modules behind in build/lib."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    source = tmp_path / "source"
    for name in ("vitcore", "cli"):
        shutil.copytree(ROOT / name, source / name, ignore=NOT_SOURCE)
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for stale in ("build/lib/cli/main.py", "build/lib/vitcore/containers.py"):
        (source / stale).parent.mkdir(parents=True, exist_ok=True)
        (source / stale).write_text("raise RuntimeError('a module of an earlier build')\n")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "--wheel-dir", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (found,) = (tmp_path / "dist").glob("vit_extract-*.whl")
    return found


def test_the_wheel_ships_every_module_and_no_generic_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    # A folder without __init__.py imports from a checkout but is left out of a wheel: this names it.
    assert {n for n in names if n.endswith(".py")} == _source_modules()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"vitcore"}
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_the_installed_wheel_imports_from_itself_alone(wheel, tmp_path):
    """Installed (not editable) and imported from elsewhere: every module imports from the install,
    and nothing reaches for a top-level cli that only a checkout has."""
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    code = ("import importlib, pkgutil, sys, vitcore\n"
            f"assert vitcore.__file__.startswith({str(target)!r}), vitcore.__file__\n"
            "names = [m.name for m in pkgutil.walk_packages(vitcore.__path__, 'vitcore.') if not m.name.endswith('.__main__')]\n"
            "for name in names:\n"
            "    importlib.import_module(name)\n"
            "assert 'cli' not in sys.modules\n"
            "from vitcore.cli.main import main\n"
            "sys.argv = ['vit-extract', '--version']\n"
            "main()\n")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == f"vit-extract {_version()}"


def _version() -> str:
    init = (ROOT / "vitcore" / "__init__.py").read_text()
    return init.split('__version__ = "', 1)[1].split('"', 1)[0]


def test_the_public_api_resolves_and_import_vitcore_loads_no_torch():
    """vitcore's lazy table names real modules (a moved module would leave a name dangling)."""
    code = ("import sys, vitcore\n"
            "assert 'torch' not in sys.modules and 'h5py' not in sys.modules\n"
            "missing = [n for n in vitcore.__all__ if getattr(vitcore, n, None) is None]\n"
            "assert not missing, missing\n"
            "print(len(vitcore.__all__))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 20
