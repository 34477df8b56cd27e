"""The typed Redis connection (:mod:`teltonika.redis.connection`): reading replies by
shape, and the lazy connection against a real redis-server."""

from __future__ import annotations

import pytest
import pytest_twisted

from teltonika.redis.connect import lazy_connection, parse_redis_url
from teltonika.redis.connection import (
    LazyConnection,
    RedisConnection,
    RedisReplyError,
    Reply,
    reply_int,
    reply_list,
    reply_text,
)


def test_reply_list() -> None:
    assert reply_list(None) == [] and reply_list([]) == []
    assert reply_list(["a", 1, None, [b"x"]]) == ["a", 1, None, [b"x"]]
    for other in ("a", b"a", 1):
        with pytest.raises(RedisReplyError, match="expected an array reply"):
            reply_list(other)


def test_reply_int() -> None:
    assert reply_int(3) == 3 and reply_int("12") == 12 and reply_int(b"-4") == -4
    with pytest.raises(ValueError):
        reply_int("OK")
    others: tuple[Reply, ...] = (None, [1])
    for other in others:
        with pytest.raises(RedisReplyError, match="expected an integer reply"):
            reply_int(other)


def test_reply_text() -> None:
    assert reply_text("1-0") == "1-0" and reply_text(7) == "7"
    assert reply_text(b"\xff1") == "\ufffd1"  # never a lone surrogate
    others: tuple[Reply, ...] = (None, ["a"])
    for other in others:
        with pytest.raises(RedisReplyError, match="expected a string reply"):
            reply_text(other)
    long: list[Reply] = [b"x" * 200]
    with pytest.raises(RedisReplyError) as info:
        reply_text(long)
    assert len(str(info.value)) < 120  # a huge reply is not copied into the message


@pytest_twisted.ensureDeferred
async def test_lazy_connection_connects_on_first_use_and_closes(redis_url: str) -> None:
    made: list[RedisConnection] = []

    def make() -> RedisConnection:
        connection = lazy_connection(parse_redis_url(redis_url))
        made.append(connection)
        return connection

    lazy = LazyConnection(make)
    assert made == []  # building it touches no socket
    await lazy.close()  # nothing made: nothing to close
    assert await lazy.set("k", "v", expire=60) == "OK"
    assert await lazy.get("k") == "v" and await lazy.exists("k") == 1
    assert await lazy.hset("h", "f", "1") == 1
    assert await lazy.hget("h", "f") == "1" and await lazy.hgetall("h") == {"f": "1"}
    assert await lazy.execute_command("PING") == "PONG" and await lazy.ping() == "PONG"
    assert await lazy.eval("return ARGV[1]", [], ["x"]) == "x"
    cursor, keys = await lazy.scan(0, pattern="*", count=100)
    assert keys in (["h", "k"], ["k", "h"]) and str(cursor) == "0"
    assert await lazy.delete(["k", "h"]) == 2
    assert len(made) == 1  # one connection, made once
    await lazy.close()
    lazy.connection()  # a closed LazyConnection makes a new one when used again
    assert len(made) == 2
    await lazy.close()
