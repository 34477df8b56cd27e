"""Turn a ``redis://`` URL into a txredisapi connection that reconnects by itself.

txredisapi is used with two deliberate settings:

* ``convertNumbers=False``: by default txredisapi turns any reply that looks numeric into
  an int or float, so a stream field ``"1"`` or an IMEI would come back with a different
  type than it went in. Our code converts explicitly where it wants numbers.
* a reply timeout: a Redis that stops answering must fail the pending Deferreds (so the
  server withholds ACKs and closes the device connection) rather than hang them forever.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import unquote, urlsplit

import attrs
from twisted.logger import Logger

DEFAULT_REPLY_TIMEOUT: Final = 10.0
_log = Logger()


class RedisURLError(ValueError):
    """The Redis URL cannot be used; the message says why, for a plain UsageError. The
    message never holds the URL's password (:func:`redact_url`)."""


def redact_url(url: str) -> str:
    """*url* with the password of its ``user:password@`` part replaced by ``***`` (for
    error messages and logs; the way the processor's PostgreSQL DSN is redacted)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    credentials, at, host = authority.rpartition("@")
    if not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}{slash}{path}"


def _redacted(password: str | None) -> str:
    return "None" if password is None else "'***'"


@attrs.frozen
class RedisAddress:
    """Where Redis is: parsed from ``redis://[user:password@]host[:port][/db]`` (or rediss://).

    Neither ``str()`` nor ``repr()`` shows the password."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=_redacted)
    tls: bool = False

    def __str__(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """Parse a Redis URL; the password never appears in ``str()`` of the result.

    :raise RedisURLError: not a redis:// or rediss:// URL, or a bad port or db.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise RedisURLError(
            f"Redis URL must start with redis:// or rediss://, not {redact_url(url)!r}"
        )
    try:
        port = parts.port or 6379
    except ValueError:
        raise RedisURLError(f"bad port in Redis URL {redact_url(url)!r}") from None
    path = parts.path.lstrip("/")
    try:
        db = int(path) if path else 0
    except ValueError:
        raise RedisURLError(f"database in Redis URL must be a number, not {path!r}") from None
    return RedisAddress(
        host=parts.hostname or "127.0.0.1",
        port=port,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=parts.scheme == "rediss",
    )


def lazy_connection(
    address: RedisAddress,
    *,
    reply_timeout: float | None = DEFAULT_REPLY_TIMEOUT,
    connect_timeout: float = 5.0,
    charset: str | None = "utf-8",
    poolsize: int = 1,
) -> Any:
    """A txredisapi connection (pool) that connects in the background and reconnects
    with backoff after any loss. Commands issued while it is down fail (or wait for the
    reconnect, depending on txredisapi's state); callers treat failures as "Redis down".

    :param charset: ``None`` returns replies as bytes.
    """
    import txredisapi

    connection = txredisapi.makeConnection(
        address.host,
        address.port,
        address.db,
        poolsize,
        True,  # reconnect
        True,  # lazy
        charset,
        address.password,
        address.tls,
        connect_timeout,
        reply_timeout,
        False,  # convertNumbers
        address.username,
    )
    # txredisapi fails its factory's "connected" Deferred when a connection is lost in the
    # middle of AUTH or SELECT (a Redis that accepts but never answers). A lazy connection
    # has nobody waiting on it, so the failure would only surface as "Unhandled error in
    # Deferred"; the commands sent meanwhile fail on their own and their callers say so.
    connected = getattr(getattr(connection, "_factory", None), "deferred", None)
    if connected is not None:
        connected.addErrback(_connection_setup_failed)
    return connection


def _connection_setup_failed(failure: Any) -> None:
    _log.info("Redis connection set-up failed: {error}", error=failure.getErrorMessage())
