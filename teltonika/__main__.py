"""``python -m teltonika``: the same command line as the ``teltonika`` console script."""

import sys

from teltonika.cli import main

sys.exit(main())
