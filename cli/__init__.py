"""The vit-extract command line (Typer), installed as vitcore.cli. Entry point: vitcore.cli.main:main
(also `python -m vitcore.cli`)."""
