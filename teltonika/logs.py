"""Log output for ``twistd --logger=teltonika.logs.json_observer``, and rate limiting.

twistd chooses where logs go; the server only emits structured ``twisted.logger`` events
with constant format strings and keyword data. This observer writes each event as one
JSON object a line on standard output, the shape log shippers read.
:class:`RateLimitedLog` keeps events a peer can trigger per packet from flooding it, and
:func:`truncated_hex` keeps the bytes a rejection shows short.
"""

from __future__ import annotations

import sys
from typing import Final

from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger, LogLevel, jsonFileLogObserver

HEX_LOG_BYTES: Final = 64
"""Bytes of a rejected frame or datagram shown (as hex) in its log event."""


def truncated_hex(data: bytes, limit: int = HEX_LOG_BYTES) -> str:
    """*data* as hex, cut to *limit* bytes with a marker saying how much was left out."""
    if len(data) <= limit:
        return data.hex()
    return f"{data[:limit].hex()}...(+{len(data) - limit} bytes)"


def json_observer() -> ILogObserver:
    """One JSON event a line on stdout (``twistd --logger=teltonika.logs.json_observer``)."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")


class RateLimitedLog:
    """At most one event per *interval* seconds for each format; the next one carries how
    many were left out in between (keyword ``suppressed``).

    For events a peer can cause once per datagram (a spoofed source, a failing device
    lookup): one line per datagram would let a flood of cheap packets flood the log.

    :param log: where the events go (their namespace and source stay the logger's).
    :param clock: tells the time.
    :param interval: seconds between two events of one format.
    """

    def __init__(self, log: Logger, clock: IReactorTime, interval: float = 10.0) -> None:
        self._log = log
        self._clock = clock
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def emit(self, level: LogLevel, format: str, **kwargs: object) -> bool:
        """Log *format* at *level* unless one was logged less than *interval* ago.

        :return: True when the event was logged.
        """
        now = self._clock.seconds()
        last = self._last.get(format)
        if last is not None and now - last < self.interval:
            self._suppressed[format] = self._suppressed.get(format, 0) + 1
            return False
        self._last[format] = now
        self._log.emit(level, format, suppressed=self._suppressed.pop(format, 0), **kwargs)
        return True
