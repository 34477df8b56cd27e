"""``twistd teltonika`` options and the service tree, on a MemoryReactor."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from teltonika.options import positive_seconds, seconds
from teltonika.redis.connect import RedisAddress
from teltonika.services.ingestion import IngestionService
from teltonika.services.ops_http import ops_service
from teltonika.sinks.jsonl import JsonLinesSink
from teltonika.sinks.redis_stream import RedisStreamSink
from teltonika.tap import Options, TeltonikaService, build_service, makeService
from tests.helpers import ThreadedMemoryReactor, process_reactor, successResultOf


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_defaults() -> None:
    """No option: port 5027, JSONL sink at ./teltonika-records.jsonl, metrics on loopback."""
    options = parse()
    assert options["port"] == "tcp:5027"
    assert options["redis"] is None
    assert options["output"] == "teltonika-records.jsonl"
    assert options["metrics"] == "tcp:9105:interface=127.0.0.1"
    assert options["udp-port"] is None
    assert options["devices"] == "open"
    assert options["redis-durability"] == "memory"
    assert options["stream-maxlen"] is None
    assert (options["login-timeout"], options["idle-timeout"]) == (30.0, 1200.0)
    assert options["max-frame"] == 65536
    assert options["luhn"] == 0


def test_parsing() -> None:
    options = parse(
        "--port",
        "tcp:6000:interface=127.0.0.1",
        "--udp-port",
        "127.0.0.1:6001",
        "--redis",
        "redis://localhost:6380/2",
        "--redis-durability",
        "fsync",
        "--stream-maxlen",
        "1000000",
        "--metrics",
        "9200",
        "--instance-id",
        "ing-1",
        "--devices",
        "redis:allowed",
        "--max-frame",
        "2048",
        "--login-timeout",
        "5",
        "--idle-timeout",
        "0",
        "--max-connections",
        "10",
        "--luhn",
    )
    assert options["port"] == "tcp:6000:interface=127.0.0.1"
    assert options["udp-port"] == ("127.0.0.1", 6001)
    assert options["metrics"] == "tcp:9200:interface=127.0.0.1"
    assert options["stream-maxlen"] == 1_000_000
    assert options["max-frame"] == 2048
    assert options["login-timeout"] == 5.0 and options["idle-timeout"] == 0.0
    assert options["luhn"] == 1
    assert parse("--port", "5999")["port"] == "tcp:5999"
    assert parse("--metrics", "off")["metrics"] is None
    assert parse("--udp-port", "5027")["udp-port"] == ("", 5027)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "bogus:1"], "--port must be a port number or an endpoint"),
        (["--redis", "http://x"], "--redis: Redis URL must start with redis://"),
        (["--redis-durability", "fsync"], "--redis-durability applies only with --redis"),
        (
            ["--redis", "redis://x", "--redis-durability", "disk"],
            "must be one of memory, fsync, replicated",
        ),
        (["--stream-maxlen", "5"], "--stream-maxlen applies only with --redis"),
        (["--devices", "ldap:x"], "--devices must be 'open', 'file:PATH' or 'redis:KEY'"),
        (["--devices", "redis:k"], "--devices redis:KEY needs --redis"),
        (["--max-frame", "10"], "--max-frame: must be at least 20 bytes, not 10"),
        (["--login-timeout", "soon"], "--login-timeout: could not convert string to float: 'soon'"),
        (["--max-connections", "-1"], "--max-connections: must be 0 or more, not -1"),
        (["--udp-port", "x:y"], "--udp-port must be PORT or INTERFACE:PORT"),
        (["--instance-id", ""], "--instance-id: must be non-empty printable text, not ''"),
        (
            ["--instance-id", "a\x00b"],
            "--instance-id: must be non-empty printable text, not 'a\\x00b'",
        ),
        (["--sink-timeout", "0"], "--sink-timeout: must be above 0, not 0"),
        (["--login-timeout", "0"], "--login-timeout: must be above 0, not 0"),
        (["--shutdown-timeout", "0"], "--shutdown-timeout: must be above 0, not 0"),
        (["--sink-timeout", "-1"], "--sink-timeout: must be above 0, not -1"),
        (["--redis-replicas", "0"], "--redis-replicas: must be at least 1, not 0"),
        (["--max-pending-frames", "0"], "--max-pending-frames: must be at least 1, not 0"),
        (["--command-quiet", "0"], "--command-quiet: must be more than 0 and at most 300"),
        (["--command-settle", "301"], "--command-settle: must be at most 300 seconds, not 301"),
        (
            ["--redis", "redis://x", "--redis-wait-timeout", "15"],
            "--redis-wait-timeout (15 s) must be below --sink-timeout (15 s)",
        ),
    ],
)
def test_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError) as info:
        parse(*argv)
    assert message in str(info.value)


_SECONDS_OPTIONS = [
    str(option[0])
    for option in Options.optParameters
    if option[4:] in ([seconds], [positive_seconds])
]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
@pytest.mark.parametrize("name", _SECONDS_OPTIONS)
def test_every_seconds_option_refuses_non_finite_values(name: str, value: str) -> None:
    """float() takes "nan" and "inf", and neither is a bound: a nan --sink-timeout made
    every frame's timer raise (no ACK, ever), a nan --login-timeout did the same per
    connection, a nan --shutdown-timeout skipped the sink's last flush. Every option in
    seconds goes through one coercer, which refuses them with a plain sentence."""
    with pytest.raises(usage.UsageError, match=f"{value} is not a finite number of seconds"):
        parse(f"--{name}", value)


def test_the_seconds_options_include_the_bounds() -> None:
    assert {"login-timeout", "sink-timeout", "shutdown-timeout", "command-timeout"} <= set(
        _SECONDS_OPTIONS
    )


def test_help_lists_every_option_with_default() -> None:
    """--help names every option and shows each default (or says when it is off)."""
    text = str(Options())
    flat = " ".join(text.split())
    for long_name, _short, default, *_ in Options.optParameters:
        assert f"--{long_name}=" in text
        if default is not None:
            assert f"[default: {default}]" in flat, long_name
    assert "--luhn" in text
    assert "(off unless given)" in flat  # --udp-port
    assert "(default: no trimming)" in flat  # --stream-maxlen
    assert "Without it records go to --output" in flat  # --redis


def _start(service: IService) -> None:
    service.privilegedStartService()
    service.startService()


def test_make_service_listens_and_starts_file_sink(tmp_path: Path) -> None:
    """build_service builds ingestion + ops; starting binds the device and metrics ports;
    stopping closes the sink."""
    reactor = ThreadedMemoryReactor()
    output = tmp_path / "out.jsonl"
    fatal: list[str] = []
    options = parse(
        "--port", "tcp:5999:interface=127.0.0.1", "--output", str(output), "--metrics", "9999"
    )
    service = build_service(options, process_reactor(reactor), on_fatal=fatal.append)
    assert isinstance(service, TeltonikaService)
    assert [s.name for s in service] == ["ingestion", "ops"]
    assert reactor.tcpServers == []  # nothing listens before start
    _start(service)
    ports = sorted((port, interface) for port, _f, _b, interface in reactor.tcpServers)
    assert ports == [(5999, "127.0.0.1"), (9999, "127.0.0.1")]
    ingestion = service.getServiceNamed("ingestion")
    assert isinstance(ingestion, IngestionService)
    started = ingestion.started
    assert started is not None
    reactor.run_until(lambda: started.called)
    sink = service.server.sink
    assert isinstance(sink, JsonLinesSink) and sink.ready()
    assert service.server.readiness["sink"]()
    assert output.exists()
    assert fatal == []
    stopped = service.stopService()
    assert isinstance(stopped, Deferred)
    reactor.run_until(lambda: stopped.called)
    successResultOf(stopped)
    assert not sink.ready()


def test_make_service_udp_listener(tmp_path: Path) -> None:
    """--udp-port adds a UDP listener next to the TCP one (MemoryReactor has no UDP:
    test_udp.py binds it for real)."""
    from twisted.application.internet import UDPServer

    options = parse(
        "--udp-port", "127.0.0.1:6001", "--output", str(tmp_path / "o"), "--metrics", "off"
    )
    service = build_service(options, process_reactor(MemoryReactorClock()), on_fatal=lambda m: None)
    assert [s.name for s in service] == ["ingestion"]
    ingestion: Any = service.getServiceNamed("ingestion")
    [_tcp] = ingestion.listeners
    udp, _datagrams = ingestion.udp
    assert isinstance(udp, UDPServer)
    assert udp.args[0] == 6001 and udp.kwargs["interface"] == "127.0.0.1"


def test_file_sink_failure_is_fatal(tmp_path: Path) -> None:
    """A sink that cannot start (unwritable output) calls on_fatal with a sentence."""
    reactor = ThreadedMemoryReactor()
    fatal: list[str] = []
    options = parse("--output", str(tmp_path / "missing" / "o.jsonl"), "--metrics", "off")
    service = build_service(options, process_reactor(reactor), on_fatal=fatal.append)
    _start(service)
    reactor.run_until(lambda: fatal)
    assert len(fatal) == 1 and "the file sink cannot start" in fatal[0]
    successResultOf(service.stopService())


def test_a_second_server_on_the_same_output_refuses_to_start(tmp_path: Path) -> None:
    """Two servers appending to one file would glue one's ACKed line onto the other's
    half-written one (each torn-line guard knows only its own writes). The file is locked:
    the second server refuses to start, in one sentence naming --output; the first one
    goes on."""
    output = tmp_path / "records.jsonl"
    reactors: list[ThreadedMemoryReactor] = []
    services: list[TeltonikaService] = []
    fatal: list[str] = []
    for metrics_port in ("9991", "9992"):  # a second instance told to change --metrics
        reactor = ThreadedMemoryReactor()
        service = build_service(
            parse("--output", str(output), "--metrics", metrics_port),
            process_reactor(reactor),
            on_fatal=fatal.append,
        )
        _start(service)
        started = service.server.ingestion.started
        assert started is not None

        def start_called(d: Deferred[None] = started) -> bool:
            return d.called

        reactor.run_until(start_called)
        reactors.append(reactor)
        services.append(service)
    first, second = (s.server.sink for s in services)
    assert first.ready() and not second.ready()
    [message] = fatal
    assert "the file sink cannot start" in message and "--output" in message
    assert str(output) in message and "\n" not in message
    for reactor, service in zip(reactors, services, strict=True):
        stopped = service.stopService()

        def stop_called(d: Deferred[None] = stopped) -> bool:
            return d.called

        reactor.run_until(stop_called)


def test_devices_file_authority(tmp_path: Path) -> None:
    """--devices file:PATH reads the list at build_service; a missing file is a UsageError."""
    reactor = MemoryReactorClock()
    devices = tmp_path / "devices.txt"
    devices.write_text("# fleet\n356307042441013\n\n490154203237518  # van 2\n")
    options = parse(
        "--devices", f"file:{devices}", "--output", str(tmp_path / "o"), "--metrics", "off"
    )
    service = build_service(options, process_reactor(reactor), on_fatal=lambda m: None)
    authority: Any = service.server.factory.authority
    assert authority.allowed == {"356307042441013", "490154203237518"}
    with pytest.raises(usage.UsageError, match="cannot read"):
        build_service(
            parse("--devices", f"file:{tmp_path / 'nope'}", "--metrics", "off"),
            process_reactor(reactor),
            on_fatal=lambda m: None,
        )


def test_redis_device_lookups_budget_per_transport_and_need_only_reachability() -> None:
    """--devices redis:KEY: TCP logins and UDP datagrams get a lookup budget each, so
    spoofed datagrams naming real IMEIs cannot use up the lookups TCP logins need; and a
    lookup is skipped only while Redis is unreachable, not while the sink refuses frames
    over its durability settings (Redis still answers lookups then)."""
    from teltonika.authority import RedisSetAuthority

    options = parse(
        "--redis",
        "redis://127.0.0.1:1/0",
        "--redis-durability",
        "fsync",
        "--devices",
        "redis:allowed",
        "--udp-port",
        "127.0.0.1:0",
        "--metrics",
        "off",
    )
    service = build_service(options, process_reactor(MemoryReactorClock()), on_fatal=lambda m: None)
    tcp = service.server.factory.authority
    assert service.server.ingestion.udp is not None
    _udp_service, datagrams = service.server.ingestion.udp
    udp = datagrams.authority
    assert isinstance(tcp, RedisSetAuthority) and isinstance(udp, RedisSetAuthority)
    assert tcp is not udp and tcp.max_in_flight == udp.max_in_flight
    sink = service.server.sink
    assert isinstance(sink, RedisStreamSink) and tcp._available is not None
    assert tcp._available == sink.reachable and udp._available == sink.reachable
    sink._reachable = True  # Redis answers, the durability is refused: not ready
    assert not sink.ready() and tcp._available()


def test_redis_connection_is_lazy() -> None:
    """build_service with --redis connects nothing; Server.redis is the shared handle."""
    reactor = MemoryReactorClock()
    service = build_service(
        parse("--redis", "redis://127.0.0.1:1/0", "--metrics", "off"),
        process_reactor(reactor),
        on_fatal=lambda m: None,
    )
    redis = service.server.redis
    assert redis is not None and not redis.made
    assert isinstance(redis.address, RedisAddress)
    assert redis.address.port == 1


def test_taken_metrics_port_exits_with_one_line(logged_errors: Any) -> None:
    """A metrics port that is taken (a second instance on one host) stops the start with
    one critical line naming the endpoint and the option to change, and exit status 1."""
    from twisted.internet import reactor

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        ops = ops_service(f"tcp:{port}:interface=127.0.0.1", CollectorRegistry(), {}, reactor)
        with pytest.raises(SystemExit) as exited:
            ops.privilegedStartService()
        assert exited.value.code == 1
    finally:
        blocker.close()
    [event] = logged_errors.flush()
    assert event["endpoint"] == f"tcp:{port}:interface=127.0.0.1"
    assert event["option"] == "--metrics"
    assert "Address already in use" in event["error"]


def test_twistd_entry_point_freezes_the_heap_and_tests_do_not(tmp_path: Path) -> None:
    """makeService (what twistd calls) asks for the frozen heap explicitly; build_service
    leaves the collector alone unless told."""
    options = parse("--output", str(tmp_path / "r.jsonl"), "--metrics", "off")
    assert makeService(options).server.ingestion.freeze_gc
    tested = build_service(options, process_reactor(MemoryReactorClock()), on_fatal=lambda m: None)
    assert not tested.server.ingestion.freeze_gc


def test_redis_tree_order_and_closing_steps() -> None:
    """With --redis: the lock starts before the listeners, the command plane after them;
    at shutdown the plane's step runs first, then the shared connection closes, then the
    lock is released."""
    service = build_service(
        parse("--redis", "redis://127.0.0.1:1/0", "--metrics", "off"),
        process_reactor(MemoryReactorClock()),
        on_fatal=lambda m: None,
    )
    assert [child.name for child in service] == ["instance-lock", "ingestion", "commands"]
    server = service.server
    assert server.redis is not None and server.commands is not None
    steps = server.ingestion._closing_steps
    lock = service.getServiceNamed("instance-lock")
    assert steps[1:] == [server.redis.disconnect, lock.release]
    assert len(steps) == 3


def test_options_reach_the_objects_they_configure() -> None:
    """Non-default values of the timing options arrive in the factory's write-queue
    settings, the Redis sink's durability check, the ingestion service and both
    publishers; --luhn reaches TCP and UDP."""
    from teltonika.protocol.queue import CommandQueueSettings

    options = parse(
        "--redis",
        "redis://127.0.0.1:1/0",
        "--redis-durability",
        "replicated",
        "--redis-wait-timeout",
        "3.5",
        "--sink-timeout",
        "21",
        "--shutdown-timeout",
        "17",
        "--command-timeout",
        "41",
        "--command-quiet",
        "0.75",
        "--command-settle",
        "2.5",
        "--luhn",
        "--udp-port",
        "127.0.0.1:0",
        "--metrics",
        "off",
    )
    service = build_service(options, process_reactor(MemoryReactorClock()), on_fatal=lambda m: None)
    factory = service.server.factory
    queue = factory.command_queue_settings
    assert isinstance(queue, CommandQueueSettings)
    assert (queue.default_timeout, queue.quiet, queue.settle) == (41.0, 0.75, 2.5)
    sink = service.server.sink
    assert isinstance(sink, RedisStreamSink)
    assert sink.durability_check.replica_timeout == 3.5
    ingestion = service.server.ingestion
    assert ingestion.shutdown_timeout == 17.0
    assert factory.publisher.timeout == 21.0 and factory.settings.sink_timeout == 21.0
    assert ingestion.udp is not None
    _udp_service, datagrams = ingestion.udp
    assert datagrams.publisher.timeout == 21.0 and datagrams.sink_timeout == 21.0
    assert factory.settings.luhn and datagrams.luhn
