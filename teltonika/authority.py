"""Device authorities: who may log in (``--devices``).

* ``open`` (default): every syntactically valid IMEI;
* ``file:PATH``: the IMEIs listed in PATH, one a line (``#`` comments and blank lines
  ignored), re-read on SIGHUP and whenever the file's mtime or size changes (checked every
  ``poll_interval`` seconds);
* ``redis:KEY``: members of the Redis set KEY (``SISMEMBER`` per login; manage it with
  ``redis-cli SADD KEY imei``).

A failing authority (unreadable file, Redis down) refuses the login: the device retries
later, which is safer than letting unknown devices in.

A Redis lookup is bounded twice, because a login (or, over UDP, every spoofable datagram)
must not make the server wait or hold memory on Redis's behalf: each lookup fails after
``timeout`` seconds, and beyond ``max_in_flight`` lookups at once a new one fails at once.
While the sink finds Redis unreachable no lookup is sent at all: txredisapi would queue
it until Redis is back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Final

from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from teltonika.interfaces import IDeviceAuthority
from teltonika.metrics import ServerMetrics
from teltonika.redis.connection import RedisConnection
from teltonika.units import SECONDS

DEFAULT_POLL_INTERVAL: Final = 5 * SECONDS
DEFAULT_LOOKUP_TIMEOUT: Final = 5 * SECONDS
"""A Redis lookup that takes longer refuses the login (well inside the 30 s login timeout,
so the device hears ``00`` rather than silence)."""
DEFAULT_MAX_LOOKUPS: Final = 1_000
"""Redis lookups in flight at once; beyond it a login is refused at once."""


class AuthorityError(Exception):
    """A lookup that gave no answer: the login is refused (the device retries later).

    :ivar reason: a stable label for the metric (``timeout``, ``busy``, ``unavailable``).
    """

    reason = "error"


class AuthorityTimeoutError(AuthorityError):
    reason = "timeout"


class AuthorityBusyError(AuthorityError):
    reason = "busy"


class AuthorityUnavailableError(AuthorityError):
    reason = "unavailable"


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
    """Members of a Redis set may log in; every lookup is bounded (module docstring).

    :param get_redis: returns the txredisapi connection; called per login, so the
        connection is made only when the server starts.
    :param clock: times the lookups out.
    :param metrics: counts lookups that gave no answer, by reason.
    :param available: False while Redis is known to be unreachable (the sink's
        reachability, not its readiness: a sink refusing frames over its durability
        settings still has a Redis that answers): lookups then fail at once instead of
        queueing in txredisapi.
    """

    _log = Logger()

    def __init__(
        self,
        get_redis: Callable[[], RedisConnection],
        key: str,
        clock: IReactorTime,
        metrics: ServerMetrics,
        *,
        timeout: float = DEFAULT_LOOKUP_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_LOOKUPS,
        available: Callable[[], bool] | None = None,
    ) -> None:
        self._get_redis = get_redis
        self.key = key
        self.clock = clock
        self.metrics = metrics
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self._available = available
        self.in_flight = 0

    def is_allowed(self, imei: str) -> Deferred[bool]:
        """IDeviceAuthority API"""
        if self._available is not None and not self._available():
            return self._refuse(AuthorityUnavailableError("Redis is unavailable"))
        if self.in_flight >= self.max_in_flight:
            return self._refuse(
                AuthorityBusyError(f"{self.in_flight} device lookups already wait for Redis")
            )
        self.in_flight += 1
        d: Deferred[object] = maybeDeferred(
            self._get_redis().execute_command, "SISMEMBER", self.key, imei
        )
        d.addTimeout(self.timeout, self.clock)
        d.addBoth(self._finished)
        return d.addCallbacks(lambda reply: str(reply) == "1", self._failed)

    def _finished(self, result: object) -> object:
        self.in_flight -= 1
        return result

    def _failed(self, failure: Failure) -> Deferred[bool]:
        if failure.check(defer.TimeoutError):  # addTimeout's
            error: AuthorityError = AuthorityTimeoutError(
                f"Redis did not answer the device lookup within {self.timeout} s"
            )
        else:
            error = AuthorityError(failure.getErrorMessage())
        return self._refuse(error)

    def _refuse(self, error: AuthorityError) -> Deferred[bool]:
        self.metrics.authority_failures.labels(error.reason).inc()
        return fail(error)


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
