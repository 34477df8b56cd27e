"""The Redis connection as this code base uses it: a typed view of txredisapi's.

txredisapi ships no type information, so mypy sees its connections as ``Any`` and every
attribute of one (a typo too) type-checks. :class:`RedisConnection` declares exactly the
calls this project makes on a connection and what each returns; the functions that make
connections (:func:`teltonika.redis.connect.lazy_connection`,
:func:`teltonika.redis.sentinel.sentinel_connection`,
:func:`teltonika.processor.fastreader.reader_connection`) return one, and everything
else takes one. A call that is not declared here is a mypy error: add it here first, with
the shape txredisapi gives its reply.

Replies arrive as txredisapi parsed them with ``convertNumbers=False``
(:mod:`teltonika.redis.connect`): bulk strings as ``str`` (``bytes`` when not UTF-8, or
on a connection made with ``charset=None``), integer replies as ``int``, nil as ``None``,
arrays as lists of those. The generic calls (``execute_command``, ``eval``) return
:data:`Reply`, that union; the code that sent a command knows the shape the command
documents and takes it apart with :func:`reply_list`, :func:`reply_int` and
:func:`reply_text`, which raise :class:`RedisReplyError` on any other shape (where the
untyped code raised ``TypeError`` or ``IndexError``).

Every call may also raise synchronously (txredisapi's pooled handler looks the method
up when called), so callers that must not raise wrap them in ``maybeDeferred``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeAlias

from twisted.internet.defer import Deferred
from twisted.logger import Logger

Reply: TypeAlias = "str | bytes | int | list[Reply] | None"
"""A parsed reply: a bulk or status string (``bytes`` when not UTF-8, or on a connection
with ``charset=None``), an integer, nil, or an array of replies."""

Argument: TypeAlias = str | bytes | int | float
"""One argument of a command (txredisapi encodes numbers as their decimal text)."""

_log = Logger()


class RedisReplyError(Exception):
    """A reply that does not have the shape its command documents."""


def _shown(reply: Reply) -> str:
    text = repr(reply)
    return text if len(text) <= 80 else text[:77] + "..."


def reply_list(reply: Reply) -> list[Reply]:
    """An array reply (nil counts as empty)."""
    if reply is None:
        return []
    if isinstance(reply, list):
        return reply
    raise RedisReplyError(f"expected an array reply, not {_shown(reply)}")


def reply_int(reply: Reply) -> int:
    """An integer reply (or a number as text, as scripts and ``convertNumbers=False``
    may give it).

    :raise ValueError: text that is not a number.
    """
    if isinstance(reply, int | str | bytes):
        return int(reply)
    raise RedisReplyError(f"expected an integer reply, not {_shown(reply)}")


def reply_text(reply: Reply) -> str:
    """A string reply as text (bytes that are not UTF-8 decoded with U+FFFD); an integer
    as its digits."""
    if isinstance(reply, bytes):
        return reply.decode("utf-8", "replace")
    if isinstance(reply, str | int):
        return str(reply)
    raise RedisReplyError(f"expected a string reply, not {_shown(reply)}")


class RedisConnection(Protocol):
    """What this project calls on a txredisapi connection (or pool, or the Sentinel
    handler): the generic command, scripts, the few typed helpers it uses, and
    :meth:`disconnect`."""

    def execute_command(self, *args: Argument) -> Deferred[Reply]:
        """Send one command; fires with its reply, fails with ``txredisapi.ResponseError``
        on an error reply (or a connection error)."""
        ...

    def eval(self, script: str, keys: list[str], args: list[str]) -> Deferred[Reply]:
        """``EVALSHA`` of *script* (txredisapi sends ``EVAL`` on the first call and after
        ``NOSCRIPT``)."""
        ...

    def ping(self) -> Deferred[str]: ...

    def get(self, key: str) -> Deferred[str | None]: ...

    def set(self, key: str, value: str, expire: int | None = None) -> Deferred[str]: ...

    def delete(self, keys: str | list[str]) -> Deferred[int]:
        """``DEL`` of one key or a list of keys (txredisapi deprecates more arguments)."""
        ...

    def exists(self, key: str) -> Deferred[int]: ...

    def hget(self, key: str, field: str) -> Deferred[str | None]: ...

    def hset(self, key: str, field: str, value: str) -> Deferred[int]: ...

    def hgetall(self, key: str) -> Deferred[dict[str, str]]: ...

    def scan(
        self, cursor: str | int = 0, pattern: str | None = None, count: int | None = None
    ) -> Deferred[list[Reply]]:
        """One ``SCAN`` step: ``[next cursor, [key, ...]]``."""
        ...

    def disconnect(self) -> Deferred[object]:
        """Close the connection (every connection of a pool) and stop reconnecting."""
        ...


class LazyConnection:
    """A :class:`RedisConnection` that makes its connection with *make* on first use, so
    that building a service touches no socket; :meth:`close` disconnects it if it was
    made (pass ``SharedConnection`` as *make* to share the process's connection, which
    its owner closes: then do not call :meth:`close`)."""

    def __init__(self, make: Callable[[], RedisConnection]) -> None:
        self._make = make
        self._connection: RedisConnection | None = None

    def connection(self) -> RedisConnection:
        """The connection, made now if it was not yet."""
        if self._connection is None:
            self._connection = self._make()
        return self._connection

    def execute_command(self, *args: Argument) -> Deferred[Reply]:
        return self.connection().execute_command(*args)

    def eval(self, script: str, keys: list[str], args: list[str]) -> Deferred[Reply]:
        return self.connection().eval(script, keys, args)

    def ping(self) -> Deferred[str]:
        return self.connection().ping()

    def get(self, key: str) -> Deferred[str | None]:
        return self.connection().get(key)

    def set(self, key: str, value: str, expire: int | None = None) -> Deferred[str]:
        return self.connection().set(key, value, expire=expire)

    def delete(self, keys: str | list[str]) -> Deferred[int]:
        return self.connection().delete(keys)

    def exists(self, key: str) -> Deferred[int]:
        return self.connection().exists(key)

    def hget(self, key: str, field: str) -> Deferred[str | None]:
        return self.connection().hget(key, field)

    def hset(self, key: str, field: str, value: str) -> Deferred[int]:
        return self.connection().hset(key, field, value)

    def hgetall(self, key: str) -> Deferred[dict[str, str]]:
        return self.connection().hgetall(key)

    def scan(
        self, cursor: str | int = 0, pattern: str | None = None, count: int | None = None
    ) -> Deferred[list[Reply]]:
        return self.connection().scan(cursor, pattern=pattern, count=count)

    def disconnect(self) -> Deferred[object]:
        return self.connection().disconnect()

    async def close(self) -> None:
        """Disconnect if a connection was made; never raises (a connection already gone
        has nothing left to release)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await connection.disconnect()
            except Exception as error:
                _log.info("Redis connection close: {error}", error=str(error))
