"""`python -m vitcore.cli`: the same as the vit-extract command."""

from .main import main

raise SystemExit(main())
