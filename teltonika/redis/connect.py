"""Turn a Redis URL into a txredisapi connection that reconnects by itself.

Two kinds of URL, parsed here and nowhere else:

* ``redis://[user:password@]host[:port][/db]`` (``rediss://`` for TLS): one server;
* ``redis+sentinel://[[user]:password@]host:port[,host:port...]/SERVICE[/db]``
  (``rediss+sentinel://`` for TLS to the sentinels and the master): the master of
  *SERVICE* as the sentinels name it, followed across failovers
  (:mod:`teltonika.redis.sentinel`). The user and password are the master's; a
  ``?sentinel_password=...`` query gives the sentinels' own password, if they have one.

:func:`lazy_connection` takes either address, so every part of the system that takes a
``--redis`` URL (server, command plane, processor, ``teltonika send``, ``teltonika
simulate --verify``) follows a Sentinel failover the same way.

txredisapi is used with two deliberate settings:

* ``convertNumbers=False``: by default txredisapi turns any reply that looks numeric into
  an int or float, so a stream field ``"1"`` or an IMEI would come back with a different
  type than it went in. Our code converts explicitly where it wants numbers.
* a reply timeout: a Redis that stops answering must fail the pending Deferreds (so the
  server withholds ACKs and closes the device connection) rather than hang them forever.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika.redis.connection import RedisConnection

DEFAULT_REPLY_TIMEOUT: Final = 10.0
DEFAULT_SENTINEL_PORT: Final = 26379
SENTINEL_SCHEMES: Final = ("redis+sentinel", "rediss+sentinel")
_log = Logger()


class RedisURLError(ValueError):
    """The Redis URL cannot be used; the message says why, for a plain UsageError. The
    message never holds the URL's password (:func:`redact_url`)."""


def redact_url(url: str) -> str:
    """*url* with the password of its ``user:password@`` part (and a
    ``sentinel_password`` query value) replaced by ``***`` (for error messages and logs;
    the way the processor's PostgreSQL DSN is redacted).

    The credentials end at the *last* ``@`` of the URL, wherever the first ``/``, ``?`` or
    ``#`` is: a password holding one of those unencoded (``redis://:pa/ss@host``) is still
    hidden, even though such a URL does not parse as the user meant it.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    credentials, at, rest = rest.rpartition("@")
    if at and ":" in credentials:
        credentials = credentials.split(":", 1)[0] + ":***"
    rest, question, query = rest.partition("?")
    if question:
        query = "&".join(
            f"{key}=***" if key == "sentinel_password" else part
            for part in query.split("&")
            for key in [part.partition("=")[0]]
        )
    return f"{scheme}://{credentials}{at}{rest}{question}{query}"


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


@attrs.frozen
class SentinelAddress:
    """Where Redis is, through Sentinel: parsed from
    ``redis+sentinel://[[user]:password@]host:port[,host:port...]/SERVICE[/db]``.

    *username* and *password* are the master's; *sentinel_password* the sentinels'.
    Neither ``str()`` nor ``repr()`` shows a password."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=_redacted)
    sentinel_password: str | None = attrs.field(default=None, repr=_redacted)
    tls: bool = False

    def __str__(self) -> str:
        scheme = SENTINEL_SCHEMES[1] if self.tls else SENTINEL_SCHEMES[0]
        hosts = ",".join(_host_port(host, port) for host, port in self.sentinels)
        return f"{scheme}://{hosts}/{self.service}/{self.db}"


AnyRedisAddress = RedisAddress | SentinelAddress
"""What ``--redis`` names: one server, or a Sentinel-managed service."""


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_sentinel_host(text: str, url: str) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` -> (host, port)."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise RedisURLError(f"bad sentinel address {text!r} in {redact_url(url)!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host or any(c in host for c in "/@?#[] "):
        raise RedisURLError(f"bad sentinel host {text!r} in {redact_url(url)!r}")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RedisURLError(f"bad sentinel port {port_text!r} in {redact_url(url)!r}")
    return host, int(port_text)


def parse_sentinel_url(url: str) -> SentinelAddress:
    """Parse ``redis+sentinel://...`` (see :class:`SentinelAddress`).

    :raise RedisURLError: no sentinel, no service name, a bad port, db or query.
    """
    scheme, _, rest = url.partition("://")
    rest, _, query = rest.partition("?")
    authority, _, path = rest.partition("/")
    credentials, at, hosts = authority.rpartition("@")
    if "@" in url.partition("://")[2] and not at:
        # the '@' is past a '/', '?' or '#' that belongs to the password
        raise RedisURLError(
            f"cannot tell the sentinels in Redis URL {redact_url(url)!r}: percent-encode '/', "
            "'?', '#' and '@' in the user name and password (%2F, %3F, %23, %40)"
        )
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
    if not hosts:
        raise RedisURLError(f"no sentinel host:port in {redact_url(url)!r}")
    sentinels = tuple(_parse_sentinel_host(part, url) for part in hosts.split(","))
    service, _, db_text = path.partition("/")
    service = unquote(service)
    if not service or not service.isprintable() or " " in service:
        raise RedisURLError(
            f"a Sentinel URL names the service after the hosts (.../SERVICE[/db]), "
            f"not {redact_url(url)!r}"
        )
    db_text = db_text.rstrip("/")
    if db_text and not db_text.isdigit():
        raise RedisURLError(
            f"database in Redis URL {redact_url(url)!r} must be a number, not {db_text!r}"
        )
    sentinel_password = None
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key != "sentinel_password":
            raise RedisURLError(f"unknown parameter {key!r} in {redact_url(url)!r}")
        sentinel_password = value or None
    return SentinelAddress(
        sentinels=sentinels,
        service=service,
        db=int(db_text) if db_text else 0,
        username=username,
        password=password,
        sentinel_password=sentinel_password,
        tls=scheme == SENTINEL_SCHEMES[1],
    )


def parse_redis_url(url: str) -> AnyRedisAddress:
    """Parse a Redis URL; the password never appears in ``str()`` of the result.

    :raise RedisURLError: not a redis://, rediss:// or redis+sentinel:// URL, or a bad
        port or db.
    """
    scheme = url.partition("://")[0]
    if scheme in SENTINEL_SCHEMES and "://" in url:
        return parse_sentinel_url(url)
    try:
        parts = urlsplit(url)
    except ValueError as error:  # "Invalid IPv6 URL"
        raise RedisURLError(f"bad Redis URL {redact_url(url)!r}: {error}") from None
    if "@" in url.partition("://")[2] and "@" not in parts.netloc:
        # the '@' is past a '/', '?' or '#' that belongs to the password
        raise RedisURLError(
            f"cannot tell the host in Redis URL {redact_url(url)!r}: percent-encode '/', '?', "
            "'#' and '@' in the user name and password (%2F, %3F, %23, %40)"
        )
    if parts.scheme not in ("redis", "rediss"):
        raise RedisURLError(
            "Redis URL must start with redis://, rediss:// or redis+sentinel://, not "
            f"{redact_url(url)!r}"
        )
    try:
        port = parts.port or 6379
    except ValueError:
        raise RedisURLError(f"bad port in Redis URL {redact_url(url)!r}") from None
    path = parts.path.lstrip("/")
    try:
        db = int(path) if path else 0
    except ValueError:
        raise RedisURLError(f"database in Redis URL {redact_url(url)!r} must be a number") from None
    return RedisAddress(
        host=parts.hostname or "127.0.0.1",
        port=port,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=parts.scheme == "rediss",
    )


def lazy_connection(
    address: AnyRedisAddress,
    *,
    reply_timeout: float | None = DEFAULT_REPLY_TIMEOUT,
    connect_timeout: float = 5.0,
    charset: str | None = "utf-8",
    poolsize: int = 1,
) -> RedisConnection:
    """A txredisapi connection (pool) that connects in the background and reconnects
    with backoff after any loss. Commands issued while it is down fail (or wait for the
    reconnect, depending on txredisapi's state); callers treat failures as "Redis down".

    :param charset: ``None`` returns replies as bytes.
    """
    if isinstance(address, SentinelAddress):
        from teltonika.redis.sentinel import sentinel_connection

        return sentinel_connection(
            address,
            reply_timeout=reply_timeout,
            connect_timeout=connect_timeout,
            charset=charset,
            poolsize=poolsize,
        )
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
    typed: RedisConnection = connection  # txredisapi is untyped: typed from here on
    return typed


def _connection_setup_failed(failure: Failure) -> None:
    _log.info("Redis connection set-up failed: {error}", error=failure.getErrorMessage())


class SharedConnection:
    """The one txredisapi connection of a server process, made on first use (at start,
    never while the service tree is built), plus fresh connections to the same Redis for
    the parts that block on reads (the caller closes those).

    :ivar address: where Redis (or its Sentinels) listens.
    """

    def __init__(self, address: AnyRedisAddress) -> None:
        self.address = address
        self._connection: RedisConnection | None = None

    def __call__(self) -> RedisConnection:
        """The shared connection; it reconnects with backoff by itself."""
        if self._connection is None:
            self._connection = lazy_connection(self.address)
        return self._connection

    @property
    def made(self) -> bool:
        """True once the shared connection was asked for."""
        return self._connection is not None

    def connect(self) -> RedisConnection:
        """Another connection to the same Redis (the caller closes it)."""
        return lazy_connection(self.address)

    def master_known(self) -> bool:
        """For ``/readyz`` through Sentinel: False while no master is known."""
        from teltonika.redis.sentinel import master_known

        return self._connection is not None and master_known(self._connection)

    def disconnect(self) -> Deferred[object] | None:
        """Close the shared connection, if one was made (the last shutdown step)."""
        if self._connection is not None:
            connection, self._connection = self._connection, None
            return connection.disconnect()
        return None
