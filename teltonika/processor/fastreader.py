"""A txredisapi connection for XREADGROUP whose replies are decoded in C.

txredisapi walks every reply in Python (``tryConvertData``: one call per element, which
for a batch of 500 entries of 16 fields is 16,000 calls) and that walk cost about a third
of the processor's time in ``benchmarks/processor.py``. This connection keeps everything
else of txredisapi (reconnect with backoff, AUTH, SELECT, TLS, reply timeout) but lets
hiredis decode UTF-8 itself and skips the walk. Bytes that are not UTF-8 become U+FFFD
(``errors="replace"``), so a hostile value can never reach PostgreSQL as a lone surrogate;
every field the contract constrains then fails its check and is dead-lettered.

Falls back to :func:`teltonika.redis.connect.lazy_connection` when hiredis is missing.
Through Sentinel (``redis+sentinel://``) the same protocol rides on
:func:`teltonika.redis.sentinel.sentinel_connection`, so the reader follows the master
across a failover like every other connection.
"""

from __future__ import annotations

from typing import Any

from teltonika.redis.connect import AnyRedisAddress, SentinelAddress, lazy_connection
from teltonika.redis.connection import RedisConnection


def reader_connection(
    address: AnyRedisAddress, *, reply_timeout: float, connect_timeout: float = 5.0
) -> RedisConnection:
    """A lazy, reconnecting connection meant for stream reads only."""
    try:
        import hiredis
        import txredisapi
    except ImportError:
        return lazy_connection(
            address, reply_timeout=reply_timeout, connect_timeout=connect_timeout
        )

    class DecodingProtocol(txredisapi.HiredisProtocol):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._reader = hiredis.Reader(
                protocolError=txredisapi.InvalidData,
                replyError=txredisapi.ResponseError,
                encoding="utf-8",
                errors="replace",
            )

        def tryConvertData(self, data: Any) -> Any:  # noqa: N802 (txredisapi's name)
            return data

    if isinstance(address, SentinelAddress):
        from teltonika.redis.sentinel import sentinel_connection

        return sentinel_connection(
            address,
            reply_timeout=reply_timeout,
            connect_timeout=connect_timeout,
            protocol=DecodingProtocol,
        )

    class DecodingFactory(txredisapi.RedisFactory):  # type: ignore[misc]
        protocol = DecodingProtocol

    factory = DecodingFactory(
        f"{address.host}:{address.port}",
        address.db,
        1,
        True,
        txredisapi.ConnectionHandler,
        "utf-8",
        address.password,
        reply_timeout,
        False,
        address.username,
    )
    factory.reconnect = True
    ssl_context_factory: Any = None
    if address.tls:
        from twisted.internet import ssl

        ssl_context_factory = ssl.ClientContextFactory()
    factory.startConnecting(
        txredisapi._makeEndpoint(address.host, address.port, connect_timeout, ssl_context_factory)
    )
    handler: RedisConnection = factory.handler  # txredisapi is untyped: typed from here on
    return handler
