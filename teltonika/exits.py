"""The one way this package leaves the process at once: flush the standard streams, then
``os._exit`` (no atexit hooks, no waiting for threads that may never finish).

Used when a stop is already overdue: a refused start whose shutdown hangs, the
processor's shutdown backstop, its non-zero exit once twistd is done.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn


def exit_now(status: int) -> NoReturn:
    """Flush stdout and stderr, then end the process with *status*."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
