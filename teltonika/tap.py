"""``twistd teltonika``: the options and the service tree (what twistd calls).

:func:`makeService` (twistd's entry: the global reactor, exit status 1 when the sink
cannot start, the heap frozen after start-up) and :func:`build_service` (the same tree on
any reactor, for tests) return a :class:`TeltonikaService` (a ``MultiService``) without
starting anything, touching a socket or setting up logging (twistd does those). Its
children, in start order:

* ``instance-lock`` -- with ``--redis`` only: one process per ``--instance-id``;
* ``ingestion`` -- :class:`~teltonika.services.ingestion.IngestionService`: the device
  listeners, the sink and the ordered shutdown;
* ``commands`` -- with ``--redis`` only: heartbeat, janitor and command consumer
  (:mod:`teltonika.commands.service`);
* ``ops`` -- ``/metrics``, ``/healthz``, ``/readyz`` (unless ``--metrics off``).

Every collaborator is built before the tree and declared on ``service.server``
(:class:`Server`, frozen): the Factory (``sessions``, ``session_listeners``), the sink,
the ingestion service, the metrics, the readiness checks, the command plane and
``redis``, the one txredisapi connection of this process
(:class:`~teltonika.redis.connect.SharedConnection`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, cast

import attrs
from prometheus_client import CollectorRegistry
from twisted.application import internet, strports
from twisted.application.service import IService, MultiService
from twisted.python import usage

from teltonika.authority import (
    FileAuthority,
    OpenAuthority,
    RedisSetAuthority,
    parse_authority_spec,
)
from teltonika.codecs import load_codecs
from teltonika.commands.consumer import DEFAULT_MAX_ATTEMPTS
from teltonika.commands.janitor import JANITOR_INTERVAL
from teltonika.commands.messages import InstanceSettings
from teltonika.commands.registry import HEARTBEAT_INTERVAL, HEARTBEAT_TTL
from teltonika.interfaces import IDeviceAuthority, IManagedSink, IProcessReactor
from teltonika.metrics import ServerMetrics
from teltonika.options import (
    CoercedOptions,
    authority_spec,
    device_endpoint,
    durability_mode,
    frame_size,
    metrics_option,
    positive_seconds,
    positive_whole_number,
    printable_name,
    redis_url,
    seconds,
    seconds_at_most,
    seconds_up_to,
    udp_address,
    whole_number,
)
from teltonika.protocol.queue import (
    DEFAULT_COMMAND_QUIET,
    DEFAULT_COMMAND_SETTLE,
    DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_MAX_DEPTH,
    DEFAULT_WARN_DEPTH,
)
from teltonika.protocol.settings import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_LOGIN_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PENDING_FRAMES,
    DEFAULT_SINK_TIMEOUT,
    ServerSettings,
)
from teltonika.protocol.tcp import DeviceFactory
from teltonika.protocol.udp import DeviceDatagramProtocol
from teltonika.redis.connect import (
    SentinelAddress,
    SharedConnection,
    parse_redis_url,
)
from teltonika.redis.durability import DEFAULT_REPLICA_TIMEOUT, DEFAULT_REPLICAS
from teltonika.services.ingestion import (
    DEFAULT_SHUTDOWN_TIMEOUT,
    FatalHandler,
    IngestionService,
    IngestionSettings,
    ReloadableAuthority,
    exit_on_fatal,
)
from teltonika.services.instance_lock import InstanceLock, InstanceLockService
from teltonika.services.ops_http import DEFAULT_SERVER_METRICS, ops_service
from teltonika.sinks.jsonl import DEFAULT_OUTPUT
from teltonika.wire.framer import DEFAULT_MAX_FRAME

if TYPE_CHECKING:
    from teltonika.commands.service import CommandPlane

DEFAULT_PORT: Final = "tcp:5027"
MAX_COMMAND_QUIET: Final = 300.0
"""Seconds; a longer quiet interval would starve commands to devices that ping often."""
MAX_COMMAND_SETTLE: Final = 300.0


class Options(CoercedOptions):
    """``twistd teltonika`` options. Add an option by appending to the lists (subclasses
    and other modules may extend ``optParameters``); :meth:`postOptions` validates."""

    synopsis = "[options]"
    longdesc = (
        "Accept Teltonika trackers (codec 8, 8E, 16 over TCP; UDP optional), publish every "
        "record to a Redis Stream (--redis) or an fsynced JSON-lines file (default), and "
        "ACK a frame only after its records are stored."
    )
    optFlags: list[list[str | None]] = [  # noqa: N815 (Twisted name)
        [
            "luhn",
            None,
            "Require a valid Luhn check digit in IMEIs (off: test fleets use non-Luhn IMEIs).",
        ],
    ]
    optParameters: list[list[Any]] = [  # noqa: N815 (Twisted name)
        [
            "port",
            "p",
            DEFAULT_PORT,
            "TCP endpoint for trackers: a port number or a description such as "
            "tcp:5027:interface=127.0.0.1; reuseport:5027 lets several processes share "
            "the port (each with its own --instance-id and --metrics port); "
            "haproxy:tcp:5027 behind a balancer sending the PROXY protocol.",
            device_endpoint,
        ],
        [
            "udp-port",
            None,
            None,
            "UDP port for trackers, PORT or INTERFACE:PORT (off unless given).",
            udp_address,
        ],
        [
            "redis",
            None,
            None,
            "Redis URL, redis://[user:password@]host:port/db, or through Sentinel "
            "redis+sentinel://[[user]:password@]host:port[,host:port...]/SERVICE[/db] (the "
            "master is followed across failovers): publish records to the stream "
            "telemetry:teltonika. Without it records go to --output.",
            redis_url,
        ],
        [
            "redis-durability",
            None,
            "memory",
            "memory: ACK once Redis holds the entries in memory. fsync: ACK only once Redis "
            "fsynced them (needs appendonly yes + appendfsync always, or Redis >= 7.2 for "
            "WAITAOF). replicated: fsync, and ACK only once --redis-replicas replicas "
            "confirmed (WAIT; WAITAOF on 7.2+), so a failover loses nothing ACKed. Checked "
            "at start-up and again while running.",
            durability_mode,
        ],
        [
            "redis-replicas",
            None,
            DEFAULT_REPLICAS,
            "With --redis-durability replicated: replicas that must confirm every batch "
            "(deploy at least one more, or a failover leaves too few and blocks ACKs).",
            positive_whole_number,
        ],
        [
            "redis-wait-timeout",
            None,
            DEFAULT_REPLICA_TIMEOUT,
            "With --redis-durability replicated: seconds a batch waits for its replicas; "
            "fewer confirmations in time and the frames are not ACKed (devices resend).",
            positive_seconds,
        ],
        [
            "stream-maxlen",
            None,
            None,
            "Trim the stream with XADD MAXLEN ~ N. Off by default: a blind trim can drop "
            "entries the processor has not read yet (default: no trimming)",
            whole_number,
        ],
        [
            "output",
            "o",
            DEFAULT_OUTPUT,
            "JSON-lines file for records when no --redis is given (appended to, fsynced "
            "before each ACK).",
        ],
        [
            "metrics",
            None,
            DEFAULT_SERVER_METRICS,
            "Endpoint for /metrics, /healthz and /readyz (loopback by default), or 'off'. "
            "One per process: processes sharing a reuseport: port each need their own.",
            metrics_option,
        ],
        [
            "instance-id",
            None,
            socket.gethostname(),
            "Name of this server instance, written into every record; with --redis also "
            "its name for the command plane. Unique per process: processes sharing a "
            "reuseport: port each need their own (a second process on this host with the "
            "same id and Redis is refused).",
            printable_name,
        ],
        [
            "devices",
            None,
            "open",
            "Device authority: open, file:PATH (one IMEI a line, reloaded on SIGHUP or "
            "change) or redis:KEY (a Redis set).",
            authority_spec,
        ],
        [
            "max-frame",
            None,
            DEFAULT_MAX_FRAME,
            "Largest data frame in bytes; a bigger one closes the connection.",
            frame_size,
        ],
        [
            "login-timeout",
            None,
            DEFAULT_LOGIN_TIMEOUT,
            "Seconds from connect to login before the connection is closed.",
            positive_seconds,
        ],
        [
            "idle-timeout",
            None,
            DEFAULT_IDLE_TIMEOUT,
            "Seconds without a byte (keepalives count) before closing; 0 disables.",
            seconds,
        ],
        [
            "max-connections",
            None,
            DEFAULT_MAX_CONNECTIONS,
            "Open device connections beyond which new ones are closed at once; 0 = no limit.",
            whole_number,
        ],
        [
            "max-pending-frames",
            None,
            DEFAULT_MAX_PENDING_FRAMES,
            "Frames waiting on one connection before it stops reading.",
            positive_whole_number,
        ],
        [
            "sink-timeout",
            None,
            DEFAULT_SINK_TIMEOUT,
            "Seconds the sink may take to store a frame before it counts as failed "
            "(no ACK, connection closed).",
            positive_seconds,
        ],
        [
            "command-timeout",
            None,
            DEFAULT_COMMAND_TIMEOUT,
            "Seconds a command waits for the device's reply (a command may ask for another).",
            positive_seconds,
        ],
        [
            "command-quiet",
            None,
            DEFAULT_COMMAND_QUIET,
            "Seconds without a byte from a device (and without an ACK or login reply to it) "
            "after which a command may be written to it, unless its next periodic frame is "
            "due; otherwise commands go out only right after an ACK (a device reads the next "
            "4 bytes after a frame as its ACK).",
            seconds_up_to(
                MAX_COMMAND_QUIET,
                why="0 would write commands while a frame may be on its way",
            ),
        ],
        [
            "command-settle",
            None,
            DEFAULT_COMMAND_SETTLE,
            "Seconds after a command timed out before the next command is written to that "
            "device (a late reply in that time is unsolicited, not the next one's); 0 = none.",
            seconds_at_most(MAX_COMMAND_SETTLE),
        ],
        [
            "command-queue-warn",
            None,
            DEFAULT_WARN_DEPTH,
            "Commands queued on one socket that log a warning.",
            whole_number,
        ],
        [
            "command-queue-max",
            None,
            DEFAULT_MAX_DEPTH,
            "Commands queued on one socket beyond which new ones fail with queue_full.",
            positive_whole_number,
        ],
        [
            "heartbeat-interval",
            None,
            HEARTBEAT_INTERVAL,
            "Seconds between heartbeats (instance:heartbeat:ID) and registry re-claims "
            "(with --redis).",
            positive_seconds,
        ],
        [
            "heartbeat-ttl",
            None,
            HEARTBEAT_TTL,
            "Seconds the heartbeat key lives (EX); other instances' janitors clean up after "
            "an instance whose heartbeat expired.",
            seconds,
        ],
        [
            "janitor-interval",
            None,
            JANITOR_INTERVAL,
            "Seconds between janitor passes (with --redis).",
            positive_seconds,
        ],
        [
            "offline-max-attempts",
            None,
            DEFAULT_MAX_ATTEMPTS,
            "Delivery attempts of an offline command before it fails with attempts_exhausted.",
            positive_whole_number,
        ],
        [
            "shutdown-timeout",
            None,
            DEFAULT_SHUTDOWN_TIMEOUT,
            "Seconds to let in-flight frames finish on shutdown, and again to close connections.",
            positive_seconds,
        ],
    ]

    def postOptions(self) -> None:
        """The rules between options (each option's own check is its coercer)."""
        if self["redis"] is None:
            if self["redis-durability"] != "memory":
                raise usage.UsageError("--redis-durability applies only with --redis")
            if self["stream-maxlen"] is not None:
                raise usage.UsageError("--stream-maxlen applies only with --redis")
        kind, _ = parse_authority_spec(str(self["devices"]))
        if kind == "redis" and self["redis"] is None:
            raise usage.UsageError("--devices redis:KEY needs --redis")
        if self["redis-wait-timeout"] >= self["sink-timeout"]:
            raise usage.UsageError(
                f"--redis-wait-timeout ({self['redis-wait-timeout']:g} s) must be below "
                f"--sink-timeout ({self['sink-timeout']:g} s): a batch waiting for its replicas "
                "longer than a frame may take to store would time out instead of being refused"
            )
        if self["heartbeat-ttl"] <= self["heartbeat-interval"]:
            raise usage.UsageError("--heartbeat-ttl must be longer than --heartbeat-interval")


@attrs.frozen
class Server:
    """The shared pieces of one server process (``TeltonikaService.server``), all built
    by :func:`build_service` before the tree is returned.

    :ivar factory: the device Factory (``sessions``, ``session_listeners``).
    :ivar sink: where records go (Redis Stream or JSON lines).
    :ivar ingestion: the listeners, the sink's lifecycle and the ordered shutdown.
    :ivar metrics: the server's metrics (``metrics.registry`` is served on /metrics).
    :ivar readiness: name -> check, served on /readyz; add checks before start.
    :ivar redis: the process's one Redis connection (with ``--redis``; ``None`` without).
    :ivar commands: the command plane (with ``--redis``; ``None`` without).
    """

    options: Options
    reactor: IProcessReactor
    metrics: ServerMetrics
    readiness: dict[str, Callable[[], bool]]
    redis: SharedConnection | None
    factory: DeviceFactory
    sink: IManagedSink
    ingestion: IngestionService
    commands: CommandPlane | None


class TeltonikaService(MultiService):
    """The root service; ``server`` holds the shared pieces (see :class:`Server`).

    :param children: started in this order (and stopped in reverse).
    """

    def __init__(self, server: Server, children: Sequence[IService]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.server = server
        for child in children:
            child.setServiceParent(self)


def _build_sink(
    options: Options,
    reactor: IProcessReactor,
    metrics: ServerMetrics,
    redis: SharedConnection | None,
) -> IManagedSink:
    settings_id = options["instance-id"]
    if redis is not None:
        from teltonika.sinks.redis_stream import RedisSinkSettings, RedisStreamSink

        return RedisStreamSink(
            redis,
            reactor,
            metrics,
            instance_id=settings_id,
            settings=RedisSinkSettings(
                durability=options["redis-durability"],
                replicas=options["redis-replicas"],
                replica_timeout=options["redis-wait-timeout"],
                maxlen=options["stream-maxlen"],
            ),
            connect=redis.connect,
        )
    from teltonika.sinks.jsonl import JsonLinesSink

    return JsonLinesSink(
        options["output"],
        reactor,
        metrics,
        instance_id=settings_id,
        reactor=reactor,
    )


def _build_authority(
    options: Options,
    reactor: IProcessReactor,
    metrics: ServerMetrics,
    redis: SharedConnection | None,
    sink: IManagedSink,
) -> tuple[IDeviceAuthority, IDeviceAuthority, FileAuthority | None]:
    """The device authority for TCP logins, the one for UDP datagrams, and the file
    authority to reload (if any).

    With ``redis:KEY`` TCP and UDP get one lookup budget each: a datagram costs nothing
    to send and its source can be spoofed, so a flood of datagrams naming real IMEIs
    while Redis is slow must not use up the lookups that real TCP logins need.
    """
    kind, argument = parse_authority_spec(options["devices"])
    if kind == "file":
        try:
            authority = FileAuthority(argument, reactor)
        except OSError as error:
            raise usage.UsageError(f"--devices: cannot read {argument}: {error}") from None
        return authority, authority, authority
    if kind == "redis":
        assert redis is not None  # postOptions: --devices redis:KEY needs --redis
        from teltonika.sinks.redis_stream import RedisStreamSink

        # While Redis is unreachable a lookup would only queue in txredisapi. Reachable
        # is enough: a sink refusing frames over its durability settings still has a
        # Redis that answers lookups (and commands still reach logged-in devices).
        available = sink.reachable if isinstance(sink, RedisStreamSink) else sink.ready

        def lookups() -> RedisSetAuthority:
            return RedisSetAuthority(redis, argument, reactor, metrics, available=available)

        return lookups(), lookups(), None
    open_authority = OpenAuthority()
    return open_authority, open_authority, None


def makeService(options: Options) -> TeltonikaService:
    """What twistd calls: :func:`build_service` on the global reactor, for a real process
    (a sink that cannot start exits with status 1; the heap is frozen after start-up)."""
    from twisted.internet import reactor as global_reactor

    reactor = cast(IProcessReactor, global_reactor)
    return build_service(options, reactor, on_fatal=exit_on_fatal(reactor), freeze_gc=True)


def build_service(
    options: Options,
    reactor: IProcessReactor,
    *,
    on_fatal: FatalHandler,
    freeze_gc: bool = False,
) -> TeltonikaService:
    """Build the service tree for *options* (see the module docstring).

    :param reactor: the global reactor in twistd; tests pass a ``MemoryReactor``.
    :param on_fatal: what to do when the sink cannot start (twistd: log, stop the
        reactor, exit status 1).
    :param freeze_gc: move start-up objects out of the collector's sight once the sink
        started (a real process; tests leave the collector alone).
    """
    metrics = ServerMetrics.create(CollectorRegistry())
    redis = SharedConnection(parse_redis_url(options["redis"])) if options["redis"] else None
    settings = ServerSettings(
        instance_id=options["instance-id"],
        max_frame=options["max-frame"],
        login_timeout=options["login-timeout"],
        idle_timeout=options["idle-timeout"],
        max_connections=options["max-connections"],
        luhn=bool(options["luhn"]),
        max_pending_frames=options["max-pending-frames"],
        sink_timeout=options["sink-timeout"],
        command_timeout=options["command-timeout"],
        command_queue_warn=options["command-queue-warn"],
        command_queue_max=options["command-queue-max"],
        command_quiet=options["command-quiet"],
        command_settle=options["command-settle"],
    )
    sink = _build_sink(options, reactor, metrics, redis)
    authority, udp_authority, file_authority = _build_authority(
        options, reactor, metrics, redis, sink
    )
    codecs = load_codecs()
    factory = DeviceFactory(
        codecs,
        sink,
        authority,
        metrics,
        reactor,
        settings,
    )
    listeners: list[IService] = [strports.service(options["port"], factory, reactor=reactor)]
    udp: tuple[IService, DeviceDatagramProtocol] | None = None
    if options["udp-port"] is not None:
        interface, port = options["udp-port"]
        datagrams = DeviceDatagramProtocol(
            codecs,
            sink,
            udp_authority,
            metrics,
            reactor,
            luhn=bool(options["luhn"]),
            sink_timeout=options["sink-timeout"],
        )
        udp = (internet.UDPServer(port, datagrams, interface=interface, reactor=reactor), datagrams)
    children: list[IService] = []
    ingestion = IngestionService(
        factory,
        sink,
        listeners,
        udp=udp,
        clock=reactor,
        on_fatal=on_fatal,
        settings=IngestionSettings(
            shutdown_timeout=options["shutdown-timeout"], freeze_gc=freeze_gc
        ),
        file_authority=(
            None if file_authority is None else ReloadableAuthority(file_authority, reactor)
        ),
    )
    ingestion.setName("ingestion")  # type: ignore[no-untyped-call]
    readiness: dict[str, Callable[[], bool]] = {"sink": sink.ready}
    commands: CommandPlane | None = None
    if redis is not None:
        ingestion.add_closing_step(redis.disconnect)
        lock = InstanceLockService(InstanceLock(options["instance-id"], options["redis"]))
        lock.setName("instance-lock")  # type: ignore[no-untyped-call]
        children.append(lock)  # first: before listening
        ingestion.add_closing_step(lock.release)
        if isinstance(redis.address, SentinelAddress):
            readiness["redis-master"] = redis.master_known
        from teltonika.commands.service import CommandPlaneSettings, command_plane

        commands = command_plane(
            factory=factory,
            ingestion=ingestion,
            redis=redis,
            clock=reactor,
            settings=CommandPlaneSettings(
                instance_id=options["instance-id"],
                heartbeat_interval=options["heartbeat-interval"],
                heartbeat_ttl=options["heartbeat-ttl"],
                janitor_interval=options["janitor-interval"],
                max_attempts=options["offline-max-attempts"],
                instance=InstanceSettings(
                    command_timeout_s=options["command-timeout"],
                    command_quiet_s=options["command-quiet"],
                    command_settle_s=options["command-settle"],
                ),
            ),
        )
    children.append(ingestion)
    if commands is not None:
        children.append(commands)
    if options["metrics"] is not None:
        ops = ops_service(options["metrics"], metrics.registry, readiness, reactor=reactor)
        ops.setName("ops")
        children.append(ops)
    server = Server(
        options=options,
        reactor=reactor,
        metrics=metrics,
        readiness=readiness,
        redis=redis,
        factory=factory,
        sink=sink,
        ingestion=ingestion,
        commands=commands,
    )
    return TeltonikaService(server, children)
