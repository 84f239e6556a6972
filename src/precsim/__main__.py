"""``python -m precsim``: the command line (see :mod:`precsim.cli`)."""

from precsim.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
