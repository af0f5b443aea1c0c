"""`python -m kanimg` is the `kanimg` command."""
from .cli import main

raise SystemExit(main())
