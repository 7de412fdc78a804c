"""``python -m fastxent``: the command line, as the ``fastxent`` script (:mod:`fastxent.cli`)."""

from fastxent.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
