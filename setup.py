"""Package discovery only; every other setting is in pyproject.toml.

Every package under vitcore/ is found (a new one needs no edit here), and the repository's cli/
folder is installed as vitcore.cli, so nothing lands in site-packages under a generic name."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["vitcore", "vitcore.*"]), "vitcore.cli",
              *(f"vitcore.cli.{name}" for name in find_packages("cli"))],
    package_dir={"vitcore.cli": "cli"},
)
