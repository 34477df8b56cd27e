"""Device authorities: who may log in (``--devices``).

* ``open`` (default): every syntactically valid IMEI;
* ``file:PATH``: the IMEIs listed in PATH, one a line (``#`` comments and blank lines
  ignored), re-read on SIGHUP and whenever the file's mtime or size changes (checked every
  ``poll_interval`` seconds);
* ``redis:KEY``: members of the Redis set KEY (``SISMEMBER`` per login; manage it with
  ``redis-cli SADD KEY imei``).

A failing authority (unreadable file, Redis down) refuses the login: the device retries
later, which is safer than letting unknown devices in.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from teltonika.interfaces import IDeviceAuthority

SECONDS: Final = 1.0
DEFAULT_POLL_INTERVAL: Final = 5 * SECONDS


class AuthoritySpecError(ValueError):
    """A ``--devices`` value that names no authority; the message says what is accepted."""


@implementer(IDeviceAuthority)
class OpenAuthority:
    """Everyone may log in."""

    def is_allowed(self, imei: str) -> Deferred[bool]:
        """IDeviceAuthority API"""
        return succeed(True)


def read_imei_file(path: Path) -> frozenset[str]:
    """The IMEIs in *path*: one a line, ``#`` starts a comment, blanks ignored."""
    imeis = set()
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            text = line.split("#", 1)[0].strip()
            if text:
                imeis.add(text)
    return frozenset(imeis)


@implementer(IDeviceAuthority)
class FileAuthority:
    """The IMEIs listed in a file, reloaded on SIGHUP or when the file changes.

    :param path: the list (must be readable at start).
    :param clock: drives the change check.
    """

    _log = Logger()

    def __init__(
        self, path: str | Path, clock: IReactorTime, poll_interval: float = DEFAULT_POLL_INTERVAL
    ) -> None:
        self.path = Path(path)
        self.clock = clock
        self.poll_interval = poll_interval
        self.allowed: frozenset[str] = frozenset()
        self._stamp: tuple[int, int] | None = None
        self._poll: LoopingCall | None = None
        self.reload()

    def is_allowed(self, imei: str) -> Deferred[bool]:
        """IDeviceAuthority API"""
        return succeed(imei in self.allowed)

    def _file_stamp(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size)

    def reload(self) -> None:
        """Re-read the file. On a read error the previous list stays in force.

        :raise OSError: only on the first load (start-up must fail loudly).
        """
        try:
            stamp = self._file_stamp()
            allowed = read_imei_file(self.path)
        except (OSError, UnicodeDecodeError) as error:
            if self._stamp is None:
                raise
            self._log.error(
                "Could not reload the device list {path}; keeping the old one: {error}",
                path=str(self.path),
                error=str(error),
            )
            return
        self._stamp = stamp
        self.allowed = allowed
        self._log.info(
            "Device list {path} loaded: {count} IMEIs", path=str(self.path), count=len(allowed)
        )

    def check_for_change(self) -> None:
        """Reload when the file's mtime or size changed; never raises (runs on a timer)."""
        try:
            stamp = self._file_stamp()
        except OSError as error:
            self._log.warn(
                "Device list {path} unreadable: {error}", path=str(self.path), error=str(error)
            )
            return
        if stamp != self._stamp:
            self.reload()

    def start(self) -> None:
        """Start polling the file for changes."""
        self._poll = LoopingCall(self.check_for_change)
        self._poll.clock = self.clock
        self._poll.start(self.poll_interval, now=False)

    def stop(self) -> None:
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None


@implementer(IDeviceAuthority)
class RedisSetAuthority:
    """Members of a Redis set may log in.

    :param get_redis: returns the txredisapi connection; called per login, so the
        connection is made only when the server starts.
    """

    def __init__(self, get_redis: Callable[[], Any], key: str) -> None:
        self._get_redis = get_redis
        self.key = key

    def is_allowed(self, imei: str) -> Deferred[bool]:
        """IDeviceAuthority API"""
        d: Deferred[object] = self._get_redis().execute_command("SISMEMBER", self.key, imei)
        return d.addCallback(lambda reply: str(reply) == "1")


def parse_authority_spec(spec: str) -> tuple[str, str]:
    """Split a ``--devices`` value into (kind, argument).

    :raise AuthoritySpecError: not ``open``, ``file:PATH`` or ``redis:KEY``.
    """
    if spec == "open":
        return ("open", "")
    kind, sep, argument = spec.partition(":")
    if sep and kind in ("file", "redis") and argument:
        return (kind, argument)
    raise AuthoritySpecError(f"--devices must be 'open', 'file:PATH' or 'redis:KEY', not {spec!r}")
