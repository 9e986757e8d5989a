"""``python -m certfx``: the ``certfx`` command (see :mod:`certfx.cli`)."""

import sys

from certfx.cli import main

if __name__ == "__main__":
    sys.exit(main())
