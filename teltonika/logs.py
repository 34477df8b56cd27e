"""Log output for ``twistd --logger=teltonika.logs.json_observer``.

twistd chooses where logs go; the server only emits structured ``twisted.logger`` events
with constant format strings and keyword data. This observer writes each event as one
JSON object a line on standard output, the shape log shippers read.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_observer() -> ILogObserver:
    """One JSON event a line on stdout (``twistd --logger=teltonika.logs.json_observer``)."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
