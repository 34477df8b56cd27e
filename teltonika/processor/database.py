"""One PostgreSQL connection on its own thread: the reactor never blocks on the database.

psycopg 3 is synchronous here on purpose: its COPY is fast and simple, and a dedicated
one-thread :class:`~twisted.python.threadpool.ThreadPool` serializes every database call
the processor makes (rehydration, the batch transaction, migrations) without locks. The
connection is opened lazily on that thread and dropped after any connection-level error,
so the next call reconnects: PostgreSQL going away and coming back needs no restart.

Every statement runs under ``statement_timeout`` and ``lock_timeout`` (set with ``SET``
right after the connection opens, not with libpq's ``options`` startup parameter, which
PgBouncer refuses or, with ``ignore_startup_parameters``, silently drops): a PostgreSQL
that stalls (a lock wait, an overloaded server) then fails the call within a bound, and the
caller treats that like a connection error, rather than waiting while ``/readyz`` says 200
and other processors claim the entries it holds. The connection is a session (a temporary
staging table, the migrations' advisory lock, the timeouts): behind PgBouncer it needs
session pooling (README.rst, "PgBouncer and TimescaleDB").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

if TYPE_CHECKING:
    import psycopg

INSTALL_HINT: Final = (
    "the processor needs psycopg 3: pip install 'teltonika[processor]' "
    "(or pip install '.[processor]' from a checkout)"
)

T = TypeVar("T")


class MissingDriverError(ImportError):
    """psycopg is not installed; the message names the command that installs it."""


def require_psycopg() -> None:
    """Import psycopg or raise :class:`MissingDriverError` with :data:`INSTALL_HINT`."""
    try:
        import psycopg  # noqa: F401
    except ImportError as e:
        raise MissingDriverError(f"{INSTALL_HINT} ({e})") from None


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for logs."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return "<unparseable DSN>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


def is_connection_error(error: BaseException) -> bool:
    """True for errors that mean "the database is unavailable" (unreachable, or it did not
    answer within ``statement_timeout`` / ``lock_timeout``), not "this data is bad"."""
    import psycopg

    return isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)


def is_timeout(error: BaseException) -> bool:
    """True when ``statement_timeout`` or ``lock_timeout`` expired (the connection is fine)."""
    import psycopg

    return isinstance(error, psycopg.errors.QueryCanceled | psycopg.errors.LockNotAvailable)


def is_unavailable(error: BaseException) -> bool:
    """True when *error* means "PostgreSQL is unavailable" (connection, timeout, or a
    server that takes no writes: a standby after a failover), which says nothing about the
    data being written."""
    import psycopg

    return is_connection_error(error) or isinstance(error, psycopg.errors.ReadOnlySqlTransaction)


def error_kind(error: BaseException) -> str:
    """The ``kind`` label of ``postgres_errors_total``: ``timeout``, ``connection`` or the
    error's class name."""
    if is_timeout(error):
        return "timeout"
    if is_connection_error(error):
        return "connection"
    return type(error).__name__


SET_TIMEOUTS: Final = (
    "SELECT set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false)"
)
"""Set both timeouts for the session (values in ms as text, ``"0"`` = none)."""


def set_timeouts(
    connection: psycopg.Connection[Any], statement_timeout: float, lock_timeout: float
) -> None:
    """Set both timeouts (seconds; 0 = none) for the rest of the session."""
    connection.execute(
        SET_TIMEOUTS, (str(round(statement_timeout * 1000)), str(round(lock_timeout * 1000)))
    )


class Database:
    """Run functions ``fn(connection, *args)`` on the database thread.

    :param dsn: a libpq URL or key=value DSN.
    :param reactor: where results are delivered.
    :param connect_timeout: seconds libpq waits for a connection.
    :param application_name: shown in ``pg_stat_activity``.
    :param statement_timeout: seconds any statement may run (0: no limit).
    :param lock_timeout: seconds any statement may wait for a lock (0: no limit).
    """

    _log = Logger()

    def __init__(
        self,
        dsn: str,
        reactor: IReactorFromThreads,
        connect_timeout: float = 5.0,
        application_name: str = "teltonika-processor",
        statement_timeout: float = 15.0,
        lock_timeout: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.statement_timeout = statement_timeout
        self.lock_timeout = lock_timeout
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.application_name = application_name
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="teltonika-processor-db")
        self._connection: psycopg.Connection[Any] | None = None
        self.connects = 0
        """How many connections were opened (read on the reactor thread for logs)."""

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        """Stop the thread (after closing the connection on it); blocks until it ends."""
        if self.pool.started:
            self.pool.callInThread(self._close)
            self.pool.stop()

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """``fn(connection, *args)`` on the database thread; its result as a Deferred."""
        d: Deferred[T] = deferToThreadPool(self.reactor, self.pool, self._call, fn, *args)
        return d

    # -- on the database thread ----------------------------------------------------
    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        connection = self._connect()
        try:
            return fn(connection, *args)
        except BaseException as e:
            if connection.closed or (is_connection_error(e) and not is_timeout(e)):
                self._close()
            raise

    def _connect(self) -> psycopg.Connection[Any]:
        import psycopg

        if self._connection is None or self._connection.closed:
            connection = psycopg.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=max(1, int(self.connect_timeout)),
                application_name=self.application_name,
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            )
            try:
                set_timeouts(connection, self.statement_timeout, self.lock_timeout)
            except BaseException:
                connection.close()
                raise
            self._connection = connection
            self.connects += 1
        return self._connection

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()
