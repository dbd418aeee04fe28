"""`python -m vitcore`: the vit-extract command, as `python -m vitcore.cli`."""

from vitcore.cli.main import main

raise SystemExit(main())
