"""``python -m fastxent``: the command line, as the ``fastxent`` script (:mod:`fastxent.cli`)."""

from fastxent.cli import main

raise SystemExit(main())
