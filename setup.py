"""Package discovery only; every other setting is in pyproject.toml.

Every package under vitcore/ is found (a new one needs no edit here), and the repository's cli/
folder is installed as vitcore.cli, so nothing lands in site-packages under a generic name."""

import shutil
from pathlib import Path

from setuptools import find_packages, setup

# pip builds in the source folder and setuptools never empties build/lib: modules a checkout no
# longer has (an older layout's top-level cli/, say) would be shipped again. Built afresh each time.
shutil.rmtree(Path(__file__).resolve().parent / "build" / "lib", ignore_errors=True)

setup(
    packages=[*find_packages(include=["vitcore", "vitcore.*"]), "vitcore.cli",
              *(f"vitcore.cli.{name}" for name in find_packages("cli"))],
    package_dir={"vitcore.cli": "cli"},
)
