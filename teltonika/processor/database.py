"""One PostgreSQL connection on its own thread: the reactor never blocks on the database.

psycopg 3 is synchronous here on purpose: its COPY is fast and simple, and a dedicated
one-thread :class:`~twisted.python.threadpool.ThreadPool` serializes every database call
the processor makes (rehydration, the batch transaction, migrations) without locks. The
connection is opened lazily on that thread and dropped after any connection-level error,
so the next call reconnects: PostgreSQL going away and coming back needs no restart.
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
    """True for errors that mean "the database is unreachable", not "this data is bad"."""
    import psycopg

    return isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)


class Database:
    """Run functions ``fn(connection, *args)`` on the database thread.

    :param dsn: a libpq URL or key=value DSN.
    :param reactor: where results are delivered.
    :param connect_timeout: seconds libpq waits for a connection.
    :param application_name: shown in ``pg_stat_activity``.
    """

    _log = Logger()

    def __init__(
        self,
        dsn: str,
        reactor: IReactorFromThreads,
        connect_timeout: float = 5.0,
        application_name: str = "teltonika-processor",
    ) -> None:
        self.dsn = dsn
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
            if is_connection_error(e) or connection.closed:
                self._close()
            raise

    def _connect(self) -> psycopg.Connection[Any]:
        import psycopg

        if self._connection is None or self._connection.closed:
            self._connection = psycopg.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=max(1, int(self.connect_timeout)),
                application_name=self.application_name,
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            )
            self.connects += 1
        return self._connection

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()
