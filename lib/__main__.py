"""``python -m lib``: the ``mednb`` command (see :mod:`lib.cli`)."""

from lib.cli import main

raise SystemExit(main())
