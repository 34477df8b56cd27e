"""Consumer groups (:mod:`teltonika.redis.groups`): the error classifier on the texts Redis
sends, and create / read / a vanished group against a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
import redis as redis_py
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from txredisapi import ResponseError

from teltonika.redis.connect import lazy_connection, parse_redis_url
from teltonika.redis.connection import RedisConnection
from teltonika.redis.groups import ConsumerGroup, Entry, GroupReply, classify, parse_entries

STREAM = "groups:test"


@pytest.mark.parametrize(
    ("text", "meaning"),
    [
        (
            "NOGROUP No such key 'groups:test' or consumer group 'g' in XREADGROUP with GROUP "
            "option",
            GroupReply.NO_GROUP,
        ),
        ("BUSYGROUP Consumer Group name already exists", GroupReply.GROUP_EXISTS),
        ("UNBLOCKED the stream key no longer exists", GroupReply.UNBLOCKED),
        ("ERR no such key", GroupReply.NO_SUCH_KEY),
        ("ERR No Such Key", GroupReply.NO_SUCH_KEY),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", GroupReply.OTHER),
        ("Not connected", GroupReply.OTHER),
        ("", GroupReply.OTHER),
        # a code only counts as the reply's code, not somewhere in a message
        ("ERR Error running script: NOGROUP in a script", GroupReply.OTHER),
    ],
)
def test_classify(text: str, meaning: GroupReply) -> None:
    assert classify(ResponseError(text)) is meaning
    assert classify(Exception(text)) is meaning


def test_classify_a_timeout_as_other() -> None:
    assert classify(TimeoutError("Redis did not answer")) is GroupReply.OTHER


def test_parse_entries() -> None:
    """An XREADGROUP entry list: ids as text, fields as sent, None for a deleted entry."""
    assert parse_entries(None) == [] and parse_entries([]) == []
    assert parse_entries([["1-0", ["a", "1"]], [b"2-0", None]]) == [
        Entry("1-0", ["a", "1"]),
        Entry("2-0", None),
    ]


def test_read_args() -> None:
    group = ConsumerGroup(STREAM, "g", "me")
    assert group.read_args("0", 10, None) == [
        "XREADGROUP",
        "GROUP",
        "g",
        "me",
        "COUNT",
        10,
        "STREAMS",
        STREAM,
        "0",
    ]
    assert group.read_args(">", 5, 2000)[6:8] == ["BLOCK", 2000]


@pytest_twisted.async_yield_fixture
async def connection(redis_url: str) -> AsyncIterator[RedisConnection]:
    made = lazy_connection(parse_redis_url(redis_url), reply_timeout=10.0)
    try:
        yield made
    finally:
        await made.disconnect()


@pytest.fixture
def rds(redis_url: str) -> Any:
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest_twisted.ensureDeferred
async def test_create_is_idempotent_and_reads_pending_then_new(
    connection: RedisConnection, rds: Any
) -> None:
    group = ConsumerGroup(STREAM, "g", "me")
    assert await group.create(connection) is True  # MKSTREAM: the stream is made too
    assert await group.create(connection) is False  # BUSYGROUP is fine
    first = rds.xadd(STREAM, {"a": "1"})
    [new] = await group.read(connection, ">", 10)
    assert new == Entry(first, ["a", "1"])
    [pending] = await group.read(connection, "0", 10)  # read, never acknowledged
    assert pending == new
    rds.xdel(STREAM, first)
    assert await group.read(connection, "0", 10) == [Entry(first, None)]
    assert await group.read(connection, ">", 10, 1) == []  # BLOCK 1 ms, nothing new


@pytest_twisted.ensureDeferred
async def test_a_destroyed_group_reads_as_no_group_and_is_created_again(
    connection: RedisConnection, rds: Any
) -> None:
    """What the processor and the command consumer do when Redis lost their group."""
    group = ConsumerGroup(STREAM, "g", "me")
    await group.create(connection)
    rds.xgroup_destroy(STREAM, "g")
    with pytest.raises(ResponseError) as info:
        await group.read(connection, ">", 10)
    assert classify(info.value) is GroupReply.NO_GROUP
    rds.delete(STREAM)
    with pytest.raises(ResponseError) as info:
        await group.read(connection, "0", 10)
    assert classify(info.value) is GroupReply.NO_GROUP
    assert await group.create(connection, "$") is True
    rds.xadd(STREAM, {"b": "2"})
    [entry] = await group.read(connection, ">", 10)
    assert entry.fields == ["b", "2"]


@pytest_twisted.ensureDeferred
async def test_a_blocked_read_on_a_deleted_stream_ends_unblocked(
    connection: RedisConnection, rds: Any
) -> None:
    group = ConsumerGroup(STREAM, "g", "me")
    await group.create(connection)
    reading = Deferred.fromCoroutine(group.read(connection, ">", 10, 10_000))
    for _ in range(500):
        if int(rds.info("clients")["blocked_clients"]) == 1:
            break
        await deferLater(reactor, 0.01, lambda: None)
    else:
        pytest.fail("the read never blocked")
    rds.delete(STREAM)
    with pytest.raises(ResponseError) as info:
        await reading
    assert classify(info.value) is GroupReply.UNBLOCKED


@pytest_twisted.ensureDeferred
async def test_xinfo_of_a_missing_stream_is_no_such_key(connection: RedisConnection) -> None:
    """The fan-out reader's and the processor's stats' case."""
    with pytest.raises(ResponseError) as info:
        await connection.execute_command("XINFO", "STREAM", "groups:missing")
    assert classify(info.value) is GroupReply.NO_SUCH_KEY
