"""Allow `python -m edgetok`."""

from edgetok.cli import main

raise SystemExit(main())
