"""The Redis Streams sink against a real redis-server (tests/conftest.py) via txredisapi."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, cast

import pytest
import pytest_twisted
import redis as redis_py
from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from teltonika.codecs import CodecRegistry
from teltonika.contract import FIELDS, MESSAGES_STREAM, TELEMETRY_STREAM, entry_values
from teltonika.metrics import ServerMetrics
from teltonika.protocol.settings import ServerSettings
from teltonika.protocol.tcp import DeviceFactory
from teltonika.redis.connect import lazy_connection, parse_redis_url
from teltonika.redis.durability import (
    CONNECTION_NAME,
    ConnectionChangedError,
    Durability,
    DurabilityError,
    ReplicasNotConfirmedError,
    check_durability,
    parse_version,
    waitaof_ok,
)
from teltonika.redis.streams import entry_id_ok, xadd_command
from teltonika.sinks import SinkUnavailableError
from teltonika.sinks.redis_stream import (
    DurabilityChangedError,
    RedisSinkSettings,
    RedisStreamSink,
)
from teltonika.wire import tcp_ack
from teltonika.wire.builtin_codecs import BUILTIN_CODECS
from tests.helpers import (
    IMEI,
    LOGIN,
    OTHER_IMEI,
    SetAuthority,
    avl_frame,
    connection_double,
    record,
)


@pytest_twisted.async_yield_fixture
async def txredis(redis_url: str) -> AsyncIterator[Any]:
    connection = lazy_connection(parse_redis_url(redis_url), reply_timeout=2.0)
    try:
        yield connection
    finally:
        await connection.disconnect()


def _sink(connection: Any, connect: Any = None, **kwargs: Any) -> RedisStreamSink:
    settings: dict[str, Any] = {"probe_interval": 0.1, "probe_timeout": 0.5, "write_timeout": 1.0}
    settings.update(kwargs)
    return RedisStreamSink(
        lambda: connection,
        reactor,
        ServerMetrics.create(CollectorRegistry()),
        instance_id="inst-7",
        settings=RedisSinkSettings(**settings),
        connect=connect,
    )


async def _wait_until(predicate: Any, timeout: float = 15.0) -> None:
    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, 0.05, lambda: None)
        waited += 0.05


def test_reply_shapes() -> None:
    """txredisapi hands entry ids back as str (convertNumbers off) and ints as ints."""
    assert entry_id_ok("1700000000000-0") and entry_id_ok(b"1-2")
    assert not entry_id_ok(1700000000000) and not entry_id_ok("OK") and not entry_id_ok(None)
    assert waitaof_ok([1, 0]) and not waitaof_ok([0, 0]) and not waitaof_ok("1")
    assert parse_version("7.0.15") == (7, 0, 15) and parse_version("7.2-rc1") == (7,)
    assert xadd_command(b"s", [b"f", b"v"]) == [b"XADD", b"s", b"*", b"f", b"v"]
    assert xadd_command(b"s", [b"f", b"v"], 5) == [
        b"XADD",
        b"s",
        b"MAXLEN",
        b"~",
        b"5",
        b"*",
        b"f",
        b"v",
    ]


@pytest_twisted.ensureDeferred
async def test_entries_match_contract_field_by_field(txredis: Any, redis_url: str) -> None:
    """Every record becomes one entry whose fields are exactly the contract's, and frames
    of two devices published in one turn share one pipeline."""
    sink = _sink(txredis)
    await sink.start()
    assert sink.ready() and sink.durability is Durability.MEMORY
    big = record(2, io=((78, 8, 2**60), (10, 0, b"\x00\xff"), (1, 1, 1)))
    d1 = sink.publish(IMEI, "8E", (record(1), big), 1_700_000_000_500)
    d2 = sink.publish(OTHER_IMEI, "8", (record(3),), 1_700_000_000_600)
    await d1
    await d2
    assert (
        sink.metrics.registry.get_sample_value("teltonika_sink_batches_total", {"sink": "redis"})
        == 1
    )
    client = redis_py.Redis.from_url(redis_url)
    # redis-py types XRANGE for any client (None, bytes or str); no decode_responses: bytes
    entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", client.xrange(TELEMETRY_STREAM))
    assert len(entries) == 3
    expected = [
        entry_values(IMEI, "8E", record(1), 1_700_000_000_500, "inst-7"),
        entry_values(IMEI, "8E", big, 1_700_000_000_500, "inst-7"),
        entry_values(OTHER_IMEI, "8", record(3), 1_700_000_000_600, "inst-7"),
    ]
    for (_, fields), values in zip(entries, expected, strict=True):
        assert list(fields.keys()) == [name.encode() for name in FIELDS]
        assert list(fields.values()) == list(values)
    assert entries[1][1][b"io"] == (
        b'{"78":{"__bigint":"1152921504606846976"},"10":{"__buffer_b64":"AP8="},"1":1}'
    )
    client.close()
    await sink.close()


@pytest_twisted.ensureDeferred
async def test_device_messages_stream(txredis: Any, redis_url: str) -> None:
    sink = _sink(txredis)
    await sink.start()
    await sink.publish_message(IMEI, {"v": "1", "imei": IMEI, "codec": "12", "text": "hi"})
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    # redis-py types XRANGE for any client (None, bytes or str); decode_responses: str
    [(_, fields)] = cast("list[tuple[str, dict[str, str]]]", client.xrange(MESSAGES_STREAM))
    assert fields == {"v": "1", "imei": IMEI, "codec": "12", "text": "hi"}
    client.close()
    await sink.close()


@pytest_twisted.ensureDeferred
async def test_maxlen_trims(txredis: Any, redis_url: str) -> None:
    sink = _sink(txredis, maxlen=10)
    await sink.start()
    for i in range(4):
        await sink.publish(IMEI, "8", tuple(record(i * 100 + j) for j in range(100)), i)
    client = redis_py.Redis.from_url(redis_url)
    # "~" trims whole radix-tree nodes (100 entries each by default), never below 10
    assert 10 <= client.xlen(TELEMETRY_STREAM) <= 200
    client.close()
    await sink.close()


@pytest_twisted.ensureDeferred
async def test_redis_killed_no_ack_then_recovery(
    txredis: Any, redis_server: Any, redis_url: str, logged_errors: Any
) -> None:
    """Redis dies: the frame in flight is not ACKed and its connection closes, the sink
    turns not-ready and refuses at once; once Redis is back frames are ACKed again."""
    sink = _sink(txredis)
    await sink.start()
    factory = DeviceFactory(
        CodecRegistry(BUILTIN_CODECS),
        sink,
        SetAuthority(),
        sink.metrics,
        reactor,
        ServerSettings(sink_timeout=3.0),
    )

    def connect() -> tuple[Any, StringTransport]:
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(LOGIN)
        return proto, transport

    proto, transport = connect()
    proto.dataReceived(avl_frame(1))
    await _wait_until(lambda: transport.value() == b"\x01" + tcp_ack(1))

    redis_server.kill()
    try:
        proto.dataReceived(avl_frame(2, start=10))
        await _wait_until(lambda: transport.disconnecting)
        assert transport.value() == b"\x01" + tcp_ack(1)  # no second ACK
        assert not sink.ready()
        with pytest.raises(SinkUnavailableError):
            await sink.publish(IMEI, "8", (record(),), 1)
    finally:
        redis_server.start()
    await _wait_until(sink.ready)
    proto2, transport2 = connect()
    proto2.dataReceived(avl_frame(2, start=10))
    await _wait_until(lambda: transport2.value() == b"\x01" + tcp_ack(2))
    client = redis_py.Redis.from_url(redis_url)
    assert client.xlen(TELEMETRY_STREAM) == 2  # the restarted Redis kept nothing before
    client.close()
    formats = {e["log_format"] for e in logged_errors.flush()}
    assert "Redis sink is down: {why}" in formats
    proto2.connectionLost()
    await sink.close()


@pytest_twisted.ensureDeferred
async def test_durability_check(txredis: Any, redis_server: Any) -> None:
    """fsync is refused (with the settings to change) unless appendonly yes +
    appendfsync always; then it is accepted. memory always passes."""
    assert await check_durability(txredis, "memory") is Durability.MEMORY
    with pytest.raises(DurabilityError, match="appendonly=no appendfsync=everysec"):
        await check_durability(txredis, "fsync")
    sink = _sink(txredis, durability="fsync")
    with pytest.raises(DurabilityError, match="appendfsync always"):
        await sink.start()
    assert not sink.ready()
    redis_server.cli("CONFIG", "SET", "appendonly", "yes")
    try:
        redis_server.cli("CONFIG", "SET", "appendfsync", "always")
        assert await check_durability(txredis, "fsync") is Durability.AOF_ALWAYS
        sink = _sink(txredis, durability="fsync")
        await sink.start()
        await sink.publish(IMEI, "8", (record(),), 1)
        await sink.close()
    finally:
        redis_server.cli("CONFIG", "SET", "appendfsync", "everysec")
        redis_server.cli("CONFIG", "SET", "appendonly", "no")


@pytest_twisted.ensureDeferred
async def test_redis_set_authority(txredis: Any, redis_server: Any) -> None:
    """SISMEMBER decides; while Redis is down a lookup fails after its timeout instead of
    waiting for Redis, and once Redis is back lookups get their own answers again (a
    timed-out command does not shift the replies of the next ones)."""
    from teltonika.authority import AuthorityError, AuthorityTimeoutError, RedisSetAuthority

    redis_server.cli("SADD", "devices", IMEI)
    authority = RedisSetAuthority(
        lambda: txredis, "devices", reactor, ServerMetrics.create(CollectorRegistry()), timeout=0.5
    )
    assert await authority.is_allowed(IMEI) is True
    assert await authority.is_allowed(OTHER_IMEI) is False
    redis_server.kill()
    try:
        with pytest.raises(AuthorityError):  # the connection is lost under it, or a timeout
            await authority.is_allowed(IMEI)
        with pytest.raises(AuthorityTimeoutError):  # txredisapi queues it until Redis is back
            await authority.is_allowed(IMEI)
    finally:
        redis_server.start()
    redis_server.cli("SADD", "devices", IMEI)
    await _wait_until(lambda: authority.in_flight == 0)
    answers = []
    for _ in range(20):
        try:
            answers.append(
                (await authority.is_allowed(IMEI), await authority.is_allowed(OTHER_IMEI))
            )
        except AuthorityTimeoutError:
            await deferLater(reactor, 0.2, lambda: None)  # still reconnecting
    assert answers and set(answers) == {(True, False)}


@pytest.fixture
def fsync_redis(redis_server: Any) -> Iterator[Any]:
    """The session's Redis with appendonly yes + appendfsync always, restored afterwards."""
    redis_server.cli("CONFIG", "SET", "appendonly", "yes")
    redis_server.cli("CONFIG", "SET", "appendfsync", "always")
    try:
        yield redis_server
    finally:
        if redis_server.process is None:
            redis_server.start()
        for name, value in (
            ("no-appendfsync-on-rewrite", "no"),
            ("appendfsync", "everysec"),
            ("appendonly", "no"),
        ):
            redis_server.cli("CONFIG", "SET", name, value)


@pytest_twisted.ensureDeferred
async def test_no_appendfsync_on_rewrite_refused_at_start(txredis: Any, fsync_redis: Any) -> None:
    """fsync mode refuses no-appendfsync-on-rewrite yes (Redis then skips the fsync while
    it rewrites the AOF, even with appendfsync always), saying which setting to change."""
    fsync_redis.cli("CONFIG", "SET", "no-appendfsync-on-rewrite", "yes")
    with pytest.raises(DurabilityError, match="configure 'no-appendfsync-on-rewrite no'"):
        await check_durability(txredis, "fsync")
    assert await check_durability(txredis, "memory") is Durability.MEMORY


def _count_checks(sink: RedisStreamSink) -> list[int]:
    """Counts the sink's finished durability checks (in a one-element list)."""
    done = [0]
    verify = sink.durability_check.verify

    async def counted(redis: Any, others: Sequence[Any] = ()) -> Durability:
        try:
            return await verify(redis, others)
        finally:
            done[0] += 1

    sink.durability_check.verify = counted  # type: ignore[method-assign]
    return done


def _durability_refused(logged_errors: Any) -> bool:
    return any("no longer gives the durability" in e["log_format"] for e in logged_errors.events)


@pytest_twisted.ensureDeferred
async def test_fsync_settings_changed_at_runtime_refuse_frames_until_restored(
    txredis: Any, fsync_redis: Any, logged_errors: Any
) -> None:
    """CONFIG SET takes fsync away while the server runs (appendfsync everysec, then
    no-appendfsync-on-rewrite yes): the periodic check notices, the sink turns not ready
    (frames refused, never ACKed), one error is logged and counted per loss however many
    checks fail; restoring the setting makes the sink ready again by itself."""
    sink = _sink(txredis, durability="fsync", durability_interval=0.1)
    await sink.start()
    assert sink.durability is Durability.AOF_ALWAYS
    await sink.publish(IMEI, "8", (record(1),), 1)
    checks = _count_checks(sink)

    def lost() -> float:
        value = sink.metrics.registry.get_sample_value("teltonika_sink_durability_lost_total")
        return value or 0.0

    for setting, bad, good in (
        ("appendfsync", "everysec", "always"),
        ("no-appendfsync-on-rewrite", "yes", "no"),
    ):
        fsync_redis.cli("CONFIG", "SET", setting, bad)
        await _wait_until(lambda: not sink.ready())
        with pytest.raises(SinkUnavailableError):
            await sink.publish(IMEI, "8", (record(2),), 2)
        assert sink.metrics.registry.get_sample_value("teltonika_sink_ready") == 0
        seen = checks[0]
        await _wait_until(lambda seen=seen: checks[0] >= seen + 3)  # several more checks fail
        [event] = logged_errors.flush()
        assert "no longer gives the durability" in event["log_format"]
        assert setting in event["why"]
        fsync_redis.cli("CONFIG", "SET", setting, good)
        await _wait_until(sink.ready)
        await sink.publish(IMEI, "8", (record(3),), 3)
    assert lost() == 2
    await sink.close()


@pytest_twisted.ensureDeferred
async def test_redis_restarted_with_other_settings_is_checked_after_the_reconnect(
    txredis: Any, fsync_redis: Any, logged_errors: Any
) -> None:
    """Redis restarts without appendonly: after txredisapi reconnects, the sink checks the
    new server before taking a frame, and stays not ready until fsync is configured."""
    sink = _sink(txredis, durability="fsync", durability_interval=60.0)  # the timer: too late
    await sink.start()
    await sink.publish(IMEI, "8", (record(1),), 1)
    fsync_redis.kill()
    fsync_redis.start()  # the command line's --appendonly no
    await _wait_until(lambda: not sink.ready())
    await _wait_until(lambda: _durability_refused(logged_errors))  # reconnected and checked
    assert not sink.ready() and sink.reachable()
    with pytest.raises(SinkUnavailableError, match="does not give the --redis-durability"):
        await sink.publish(IMEI, "8", (record(2),), 2)
    fsync_redis.cli("CONFIG", "SET", "appendonly", "yes")
    fsync_redis.cli("CONFIG", "SET", "appendfsync", "always")
    await _wait_until(sink.ready)
    await sink.publish(IMEI, "8", (record(3),), 3)
    formats = {e["log_format"] for e in logged_errors.flush()}
    assert any("no longer gives the durability" in f for f in formats)
    await sink.close()


@pytest_twisted.ensureDeferred
async def test_reconnect_between_checks_is_caught_by_the_next_batch(
    txredis: Any, fsync_redis: Any
) -> None:
    """Redis drops the sink's connection and txredisapi reconnects between two checks,
    with no command in flight, so nothing notices (the probe and the periodic check are
    far off). The next batch goes over a connection whose settings were never verified:
    it is not ACKed (the devices resend), and the sink verifies the new connection at once
    and takes frames again."""
    sink = _sink(txredis, durability="fsync", probe_interval=60.0, durability_interval=60.0)
    await sink.start()
    await sink.publish(IMEI, "8", (record(1),), 1)
    observer = redis_py.Redis(port=fsync_redis.port)
    observer.client_setname("test-observer")

    def sink_connections() -> list[int]:
        return [int(c["id"]) for c in observer.client_list() if c["name"] != "test-observer"]

    [checked] = [c for c in observer.client_list() if c["name"] == CONNECTION_NAME]
    observer.client_kill_filter(_id=checked["id"])
    await _wait_until(lambda: sink_connections() not in ([], [int(checked["id"])]))
    assert sink.ready()  # nothing noticed
    with capturedLogs() as events, pytest.raises(ConnectionChangedError):
        await sink.publish(IMEI, "8", (record(2),), 2)
    assert any("reconnected since the durability check" in e["log_format"] for e in events)
    await _wait_until(sink.ready)  # the new connection verified
    await sink.publish(IMEI, "8", (record(3),), 3)
    [renamed] = [c for c in observer.client_list() if c["name"] == CONNECTION_NAME]
    assert renamed["id"] != checked["id"]
    observer.close()
    await sink.close()


@pytest_twisted.ensureDeferred
async def test_device_lookups_go_on_while_only_the_durability_is_refused(
    txredis: Any, fsync_redis: Any, logged_errors: Any
) -> None:
    """fsync taken away at runtime: frames are refused with that reason (not "Redis is
    unreachable"), while device lookups, which need only a Redis that answers, still get
    their answers instead of failing as "unavailable"."""
    from teltonika.authority import RedisSetAuthority

    sink = _sink(txredis, durability="fsync", durability_interval=0.1)
    await sink.start()
    fsync_redis.cli("SADD", "devices", IMEI)
    authority = RedisSetAuthority(
        lambda: txredis,
        "devices",
        reactor,
        ServerMetrics.create(CollectorRegistry()),
        available=sink.reachable,
    )
    fsync_redis.cli("CONFIG", "SET", "appendfsync", "everysec")
    await _wait_until(lambda: not sink.ready())
    with pytest.raises(SinkUnavailableError, match="does not give the --redis-durability"):
        await sink.publish(IMEI, "8", (record(1),), 1)
    assert await authority.is_allowed(IMEI) is True
    assert await authority.is_allowed(OTHER_IMEI) is False
    logged_errors.flush()
    await sink.close()


class _HeldRedis:
    """A stand-in connection for a Redis 7.2 (the suite's redis-server is 7.0, which has
    no WAITAOF): commands take effect in the order sent and their replies wait until
    :meth:`answer`, as on a real connection with a round trip in between."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.config = {
            "appendonly": "yes",
            "appendfsync": "always",
            "no-appendfsync-on-rewrite": "no",
        }
        self.sent: list[tuple[list[str], Deferred[Any]]] = []

    def execute_command(self, *args: Any) -> Deferred[Any]:
        command = [a.decode() if isinstance(a, bytes) else str(a) for a in args]
        d: Deferred[Any] = Deferred()
        self.sent.append((command, d))
        d.reply = self._execute(command)  # type: ignore[attr-defined]
        return d

    def _execute(self, command: list[str]) -> Any:
        if command[:2] == ["CLIENT", "SETNAME"]:
            self.name = command[2]
            return "OK"
        if command[:2] == ["CLIENT", "GETNAME"]:
            return self.name
        if command[:2] == ["CONFIG", "GET"]:
            return [command[2], self.config[command[2]]]
        if command[0] == "INFO":
            return "# Server\r\nredis_version:7.2.4\r\n"
        if command[0] == "EVAL":
            return len(command) - 6 - int(command[5])
        if command[0] == "WAITAOF":
            return [1, 0]
        return "PONG"

    def answer(self) -> None:
        sent, self.sent = self.sent, []
        for _, d in sent:
            d.callback(d.reply)  # type: ignore[attr-defined]


def test_a_batch_built_before_a_check_changed_the_mode_is_not_acked() -> None:
    """Redis 7.2, appendfsync always: batches carry no WAITAOF. Then CONFIG SET
    appendfsync everysec; a check goes out, and a batch right behind it is built for the
    old mode. The check answers first (WAITAOF from now on); the batch, written under
    everysec without WAITAOF, must not be ACKed. The next batch carries WAITAOF and is."""
    from twisted.internet.task import Clock

    from tests.helpers import failureResultOf, successResultOf

    clock, redis = Clock(), _HeldRedis()
    sink = RedisStreamSink(
        lambda: connection_double(redis),
        clock,
        ServerMetrics.create(CollectorRegistry()),
        instance_id="i",
        settings=RedisSinkSettings(
            durability="fsync", probe_interval=60.0, durability_interval=5.0
        ),
    )
    started = Deferred.fromCoroutine(sink.start())
    redis.answer()
    successResultOf(started)
    assert sink.durability is not None
    assert sink.durability.value == "aof-always"  # `is` would narrow past answer()
    redis.config["appendfsync"] = "everysec"
    clock.advance(5.0)  # the periodic check is sent
    d = sink.publish(IMEI, "8", (record(1),), 1)
    clock.advance(0)  # the batch is sent behind it, without WAITAOF
    assert not any(command[0] == "WAITAOF" for command, _ in redis.sent)
    redis.answer()
    assert sink.durability is Durability.WAITAOF
    failureResultOf(d, DurabilityChangedError)
    assert sink.ready()  # the check passed: the sink goes on, in the new mode
    d = sink.publish(IMEI, "8", (record(2),), 2)
    clock.advance(0)
    assert any(command[0] == "WAITAOF" for command, _ in redis.sent)
    redis.answer()
    successResultOf(d)
    closing = Deferred.fromCoroutine(sink.close())
    successResultOf(closing)


@pytest_twisted.ensureDeferred
async def test_replicated_waits_for_connected_replicas(
    txredis: Any, fsync_redis: Any, logged_errors: Any
) -> None:
    """replicated is refused while the master has no replica; with one connected, batches
    go out over four named writer connections and WAIT confirms each; once the replica
    is gone a batch is not ACKed (WAIT counts 0 within the timeout), the metric counts it
    and the check it triggers turns the sink not ready."""
    from tests.servers import RedisServer

    with pytest.raises(DurabilityError, match="0 replica"):
        await check_durability(txredis, "replicated")
    replica = RedisServer(extra=["--replicaof", "127.0.0.1", str(fsync_redis.port)]).start()
    opened: list[Any] = []
    sink: RedisStreamSink | None = None

    def connect() -> Any:
        opened.append(lazy_connection(parse_redis_url(fsync_redis.url), reply_timeout=2.0))
        return opened[-1]

    try:
        await _wait_until(lambda: "state=online" in fsync_redis.cli("INFO", "replication"))
        sink = _sink(
            txredis,
            durability="replicated",
            # a loaded machine can take more than 0.3 s for the replica's ACK; the
            # write timeout stays above the wait (the tap's rule against --sink-timeout)
            replica_timeout=1.5,  # below the connections' 2 s reply timeout
            write_timeout=3.0,
            connect=connect,
            durability_interval=60,
        )
        await sink.start()
        assert sink.durability is Durability.REPLICATED and len(opened) == 3
        clients = fsync_redis.cli("CLIENT", "LIST")
        assert clients.count(f"name={CONNECTION_NAME}") == 4
        await sink.publish(IMEI, "8", (record(),), 1)
        replica.kill()
        await _wait_until(lambda: "connected_slaves:0" in fsync_redis.cli("INFO", "replication"))
        with pytest.raises(ReplicasNotConfirmedError, match="0 of 1"):
            await sink.publish(IMEI, "8", (record(),), 2)
        await _wait_until(lambda: not sink.ready())
        assert sink.metrics.sink_replicas_unconfirmed._value.get() == 1
    finally:
        replica.cleanup()
        if sink is not None:
            await sink.close()  # closes the writer connections it opened
    logged_errors.flush(
        "Redis no longer gives the durability asked for; refusing frames until it does: {why}"
    )
