"""The TCP server's settings and their defaults (``twistd teltonika`` options).

One frozen value, built once by the tap and shared by every session through the Factory,
so the limits are in one place that imports nothing but the parts they configure: the
framer's frame size, and the write queue's command timings and its settings value
(``CommandQueueSettings``, built once by :meth:`ServerSettings.command_queue`).
"""

from __future__ import annotations

from typing import Final

import attrs

from teltonika.protocol.queue import (
    DEFAULT_COMMAND_QUIET,
    DEFAULT_COMMAND_SETTLE,
    DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_MAX_DEPTH,
    DEFAULT_WARN_DEPTH,
    CommandQueueSettings,
)
from teltonika.units import SECONDS
from teltonika.wire.framer import DEFAULT_MAX_FRAME

MINUTE: Final = 60 * SECONDS

DEFAULT_LOGIN_TIMEOUT: Final = 30 * SECONDS
DEFAULT_IDLE_TIMEOUT: Final = 20 * MINUTE
DEFAULT_SINK_TIMEOUT: Final = 15 * SECONDS
"""Well inside the device's default 30 s response timeout (docs/protocol.rst, section
'Device timers')."""
DEFAULT_MAX_CONNECTIONS: Final = 20_000
DEFAULT_MAX_PENDING_FRAMES: Final = 8
DEFAULT_CLOSE_GRACE: Final = 5 * SECONDS
"""How long a closing connection may take to flush what is left to write (a last ACK, a
``00``) before it is aborted: a peer that stops reading would otherwise keep its socket
and its ``--max-connections`` slot for ever."""


@attrs.frozen
class ServerSettings:
    """The limits of the TCP server (all from ``twistd teltonika`` options).

    :ivar instance_id: names this server in every record it publishes.
    :ivar max_frame: largest data frame in bytes, framing included.
    :ivar login_timeout: seconds from connect to a successful login.
    :ivar idle_timeout: seconds without any byte (keepalives count) before closing; 0 = off.
    :ivar max_connections: open device connections beyond which new ones are closed at once.
    :ivar luhn: require a valid Luhn check digit in IMEIs.
    :ivar max_pending_frames: frames waiting on one connection before it stops reading.
    :ivar sink_timeout: seconds a sink may take before the frame counts as failed.
    :ivar command_timeout: seconds a command waits for the device's reply by default.
    :ivar command_queue_warn: queued commands on one socket that log a warning.
    :ivar command_queue_max: queued commands on one socket beyond which commands are refused.
    :ivar command_quiet: seconds without a received byte after which an idle connection
        may get a command (otherwise only right after an ACK).
    :ivar command_settle: seconds after a command timed out before the next is written.
    :ivar close_grace: seconds a closing connection may take before it is aborted.
    """

    instance_id: str = "teltonika"
    max_frame: int = DEFAULT_MAX_FRAME
    login_timeout: float = DEFAULT_LOGIN_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    luhn: bool = False
    max_pending_frames: int = DEFAULT_MAX_PENDING_FRAMES
    sink_timeout: float = DEFAULT_SINK_TIMEOUT
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    command_queue_warn: int = DEFAULT_WARN_DEPTH
    command_queue_max: int = DEFAULT_MAX_DEPTH
    command_quiet: float = DEFAULT_COMMAND_QUIET
    command_settle: float = DEFAULT_COMMAND_SETTLE
    close_grace: float = DEFAULT_CLOSE_GRACE

    def command_queue(self) -> CommandQueueSettings:
        """The ``--command-*`` knobs as every socket's write queue takes them (the
        factory builds this once and hands the same value to each session)."""
        return CommandQueueSettings(
            default_timeout=self.command_timeout,
            warn_depth=self.command_queue_warn,
            max_depth=self.command_queue_max,
            quiet=self.command_quiet,
            settle=self.command_settle,
        )
