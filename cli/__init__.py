"""The vit-extract command line (Typer). Entry point: cli.main:main."""
