"""The :class:`~teltonika.interfaces.ISink` implementations.

* :mod:`teltonika.sinks.redis_stream` -- one Redis Stream entry per record (``--redis``);
* :mod:`teltonika.sinks.jsonl` -- the embedded default: an fsynced JSON-lines file.

Both batch across connections (:mod:`teltonika.sinks.batch`): whatever frames arrive
while one round trip is in flight share the next one, so the cost of a pipeline or an
fsync is paid once per batch, not once per record.
"""

from __future__ import annotations


class SinkError(Exception):
    """A sink could not store what it was given; nothing may be assumed stored."""


class SinkUnavailableError(SinkError):
    """The sink is down (Redis unreachable, file not writable): fail at once, queue nothing."""


class SinkOverloadedError(SinkError):
    """More records are waiting for the sink than its bound allows: memory stays flat."""


class SinkClosedError(SinkError):
    """The sink was closed (shutdown) before the records could be written."""
