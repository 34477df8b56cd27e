"""Defaults of the processor's loop and timer, each written once: the settings classes of
``consumer`` and ``service`` and the tap's ``--help`` read them from here.

They live in a module of their own because ``consumer`` and ``service`` import psycopg,
which the tap must not need just to be listed by twistd or to print its usage.
"""

from __future__ import annotations

from typing import Final

BATCH_SIZE: Final = 500
"""Entries (a count): the default ``--batch-size``, per XREADGROUP and per transaction."""
STATS_INTERVAL: Final = 5.0
"""Seconds: the default ``--stats-interval`` between consumer lag/pending updates."""
TRIM_INTERVAL: Final = 60.0
"""Seconds: the default ``--trim-interval`` between trims when ``--trim`` is on."""
SHUTDOWN_TIMEOUT: Final = 15.0
"""Seconds: the default ``--shutdown-timeout`` after which the backstop forces the exit."""
