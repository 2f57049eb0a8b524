"""``python -m proxyd``: the same entry point as the installed ``proxyd`` command."""

from proxyd.cli import main

raise SystemExit(main())
