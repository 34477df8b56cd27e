"""``twistd teltonika-processor``: Options and makeService.

``makeService`` builds the service tree and starts nothing: the ops listener
(``/metrics``, ``/healthz``, ``/readyz``) and the :class:`ProcessorService`. Secrets stay
out of the process list: ``--postgres`` defaults to ``$TELTONIKA_POSTGRES_DSN`` and
``--redis`` to ``$TELTONIKA_REDIS_URL``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, cast

from prometheus_client import CollectorRegistry
from twisted.application.service import IService, MultiService
from twisted.python import usage

from teltonika.contract import TELEMETRY_STREAM
from teltonika.interfaces import IProcessReactor
from teltonika.options import (
    group_start,
    metrics_option,
    non_empty,
    positive_seconds,
    positive_whole_number,
    redis_url,
    seconds,
)
from teltonika.processor.defaults import (
    BATCH_SIZE,
    SHUTDOWN_TIMEOUT,
    STATS_INTERVAL,
    TRIM_INTERVAL,
)
from teltonika.processor.live.options import LiveOptions
from teltonika.processor.streams import COMMAND_TIMEOUT, DEAD_MAXLEN, DEAD_STREAM
from teltonika.redis.connect import SentinelAddress, parse_redis_url
from teltonika.services.ops_http import DEFAULT_PROCESSOR_METRICS

if TYPE_CHECKING:
    from teltonika.processor.service import ProcessorService
    from teltonika.redis.connection import RedisConnection

POSTGRES_ENV: Final = "TELTONIKA_POSTGRES_DSN"
REDIS_ENV: Final = "TELTONIKA_REDIS_URL"
DEFAULT_REDIS: Final = "redis://127.0.0.1:6379/0"
STATEMENT_TIMEOUT: Final = 15.0
"""Seconds: the default ``--statement-timeout`` (well under the default --claim-idle, 60)."""
LOCK_TIMEOUT: Final = 5.0
"""Seconds: the default ``--lock-timeout``."""
REFRESH_INTERVAL: Final = 5.0
"""Seconds: the default ``--refresh-interval``."""


class Options(LiveOptions):
    """Command line of ``twistd teltonika-processor`` (the ``--live*`` options come from
    :class:`~teltonika.processor.live.options.LiveOptions`)."""

    synopsis = "[options]"
    longdesc = (
        "Read the telemetry stream as a consumer group, write each record once into the "
        "PostgreSQL table positions, keep every device's latest position in memory, and "
        "acknowledge an entry only after its row is committed. See README.rst, 'The processor'."
    )

    optFlags = [  # noqa: N815
        [
            "trim",
            None,
            "Trim the stream with XTRIM MINID below the oldest entry any consumer "
            "group still needs (off by default).",
        ],
    ]
    optParameters: list[list[Any]] = [  # noqa: N815
        [
            "redis",
            None,
            None,
            f"Redis URL redis://[user:password@]host[:port][/db], or through Sentinel "
            "redis+sentinel://[[user]:password@]host:port[,host:port...]/SERVICE[/db] "
            f"(default: ${REDIS_ENV}, else {DEFAULT_REDIS}).",
            redis_url,
        ],
        [
            "postgres",
            None,
            None,
            f"PostgreSQL libpq URL or DSN (default: ${POSTGRES_ENV}; use the variable to keep "
            "the password out of the process list).",
        ],
        ["stream", None, TELEMETRY_STREAM, "Stream to consume."],
        ["dead-stream", None, DEAD_STREAM, "Dead-letter stream."],
        [
            "dead-maxlen",
            None,
            DEAD_MAXLEN,
            "Approximate cap on the dead-letter stream.",
            positive_whole_number,
        ],
        ["group", None, "processor", "Consumer group (shared by all processors)."],
        [
            "group-start",
            None,
            "0",
            "Where a newly created group starts: 0 = everything in the stream, "
            "$ = new entries only, or an entry id MS-SEQ.",
            group_start,
        ],
        [
            "consumer",
            None,
            socket.gethostname(),
            "This instance's consumer name; must be unique in the group and stable across "
            "restarts (it re-reads its own pending entries on start). A name that is never "
            "used again stays in the group: see --retire-idle-consumers.",
            non_empty,
        ],
        [
            "retire-idle-consumers",
            None,
            0.0,
            "Delete other consumers of the group that have nothing pending and have been "
            "idle longer than this (seconds; at least --claim-idle; 0 = never). For "
            "deployments whose consumer names change (container host names).",
            seconds,
        ],
        [
            "batch-size",
            None,
            BATCH_SIZE,
            "Entries per XREADGROUP and per transaction.",
            positive_whole_number,
        ],
        [
            "block-ms",
            None,
            2000,
            "How long one XREADGROUP waits for new entries (ms).",
            positive_whole_number,
        ],
        [
            "claim-idle",
            None,
            60.0,
            "Take over entries pending in another consumer for longer than this (seconds).",
            positive_seconds,
        ],
        [
            "claim-interval",
            None,
            10.0,
            "How often to look for idle entries (seconds).",
            positive_seconds,
        ],
        [
            "refresh-interval",
            None,
            None,
            "How often every entry this processor holds is refreshed (XCLAIM JUSTID) so that "
            f"no peer claims it (seconds; at most half of --claim-idle; default "
            f"{REFRESH_INTERVAL:g}, or a quarter of --claim-idle when that is less).",
            positive_seconds,
        ],
        [
            "max-deliveries",
            None,
            5,
            "An entry delivered more than this many times is written alone, and "
            "dead-lettered if that fails for any reason but PostgreSQL being unavailable.",
            positive_whole_number,
        ],
        [
            "state-size",
            None,
            100_000,
            "Most devices held in memory (least recently seen evicted).",
            positive_whole_number,
        ],
        [
            "metrics",
            None,
            DEFAULT_PROCESSOR_METRICS,
            "Endpoint for /metrics, /healthz, /readyz (a port number means loopback; "
            "'off' disables).",
            metrics_option,
        ],
        [
            "trim-interval",
            None,
            TRIM_INTERVAL,
            "Seconds between trims when --trim is on.",
            positive_seconds,
        ],
        [
            "stats-interval",
            None,
            STATS_INTERVAL,
            "Seconds between consumer lag/pending updates.",
            positive_seconds,
        ],
        [
            "retry-max",
            None,
            5.0,
            "Longest backoff between retries of Redis or PostgreSQL (seconds).",
            positive_seconds,
        ],
        [
            "statement-timeout",
            None,
            None,
            "Longest a PostgreSQL statement may run before it fails and is retried "
            f"(seconds; below --claim-idle; default {STATEMENT_TIMEOUT:g}, or a quarter of "
            "--claim-idle when that is less).",
            positive_seconds,
        ],
        [
            "lock-timeout",
            None,
            None,
            "Longest a PostgreSQL statement may wait for a lock before it fails and is "
            f"retried (seconds; below --claim-idle; default {LOCK_TIMEOUT:g}, or a twelfth "
            "of --claim-idle when that is less).",
            positive_seconds,
        ],
        [
            "shutdown-timeout",
            None,
            SHUTDOWN_TIMEOUT,
            "Backstop: force the exit when shutdown takes longer (seconds).",
            positive_seconds,
        ],
    ]

    def postOptions(self) -> None:
        from teltonika.processor.database import MissingDriverError, require_psycopg

        try:
            require_psycopg()
        except MissingDriverError as e:
            raise usage.UsageError(str(e)) from None
        if not self["redis"]:
            # the fallback goes through --redis's own coercer, named by where it came from
            fallback = os.environ.get(REDIS_ENV) or DEFAULT_REDIS
            try:
                self["redis"] = redis_url(fallback)
            except ValueError as e:
                raise usage.UsageError(f"${REDIS_ENV}: {e}") from None
        self["redis-address"] = parse_redis_url(self["redis"])
        self["postgres"] = self["postgres"] or os.environ.get(POSTGRES_ENV)
        if not self["postgres"]:
            raise usage.UsageError(f"give --postgres DSN or set ${POSTGRES_ENV}")
        claim_idle = self["claim-idle"]
        if self["statement-timeout"] is None:
            self["statement-timeout"] = min(STATEMENT_TIMEOUT, claim_idle / 4)
        if self["lock-timeout"] is None:
            self["lock-timeout"] = min(LOCK_TIMEOUT, claim_idle / 12)
        if self["refresh-interval"] is None:
            self["refresh-interval"] = min(REFRESH_INTERVAL, claim_idle / 4)
        if self["refresh-interval"] > claim_idle / 2:
            raise usage.UsageError(
                f"--refresh-interval ({self['refresh-interval']:g} s) must be at most half of "
                f"--claim-idle ({claim_idle:g} s): a held entry goes idle for up to one "
                "interval plus the time one refresh takes, and must never reach --claim-idle"
            )
        for name in ("statement-timeout", "lock-timeout"):
            if self[name] >= claim_idle:
                raise usage.UsageError(
                    f"--{name} ({self[name]:g} s) must be below --claim-idle ({claim_idle:g} s): "
                    "a write stalled that long would let other processors claim its entries"
                )
        retire = self["retire-idle-consumers"]
        if retire and retire < claim_idle:
            raise usage.UsageError(
                f"--retire-idle-consumers ({retire:g} s) must be at least --claim-idle "
                f"({claim_idle:g} s), so that a consumer is retired only after its entries "
                "could be claimed"
            )
        self.check_live()


class ProcessorTree(MultiService):
    """The root service: the ops listener (unless ``--metrics off``), the
    :class:`~teltonika.processor.service.ProcessorService` and, with ``--live``, the live
    service, started in that order.

    :ivar processor: the processor service (its consumer, streams and database).
    """

    def __init__(self, processor: ProcessorService, children: Sequence[IService]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.processor = processor
        for child in children:
            child.setServiceParent(self)


def makeService(options: Options, reactor: IProcessReactor | None = None) -> ProcessorTree:
    """Build the service tree (starts nothing).

    :param reactor: defaults to the global reactor (twistd); tests may pass a
        ``MemoryReactor``.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = cast(IProcessReactor, global_reactor)

    from teltonika.processor.consumer import Consumer, ConsumerConfig
    from teltonika.processor.database import Database, redact_dsn
    from teltonika.processor.fastreader import reader_connection
    from teltonika.processor.metrics import ProcessorMetrics
    from teltonika.processor.migrations import apply_migrations
    from teltonika.processor.service import (
        ExitPolicy,
        Housekeeping,
        ProcessorService,
        exit_after_shutdown,
    )
    from teltonika.processor.state import DeviceState
    from teltonika.processor.streams import Streams, StreamsSettings
    from teltonika.redis.connect import lazy_connection
    from teltonika.services.ops_http import ops_service

    registry = CollectorRegistry()
    metrics = ProcessorMetrics.create(registry)
    block_ms = int(options["block-ms"])
    address = options.get("redis-address") or parse_redis_url(options["redis"])
    timeout = COMMAND_TIMEOUT

    connections: list[RedisConnection] = []

    def connect() -> tuple[RedisConnection, RedisConnection]:
        """Called by ProcessorService.startService: makeService touches no network."""
        made = (
            lazy_connection(address, reply_timeout=timeout),
            reader_connection(address, reply_timeout=timeout + block_ms / 1000),
        )
        connections[:] = made
        return made

    def master_known() -> bool:
        """Through Sentinel: False while a connection knows no master (a failover)."""
        from teltonika.redis.sentinel import master_known as known

        return bool(connections) and all(known(connection) for connection in connections)

    streams = Streams(
        reactor,
        options["stream"],
        options["group"],
        options["consumer"],
        settings=StreamsSettings(
            dead_stream=options["dead-stream"],
            dead_maxlen=int(options["dead-maxlen"]),
            timeout=timeout,
        ),
    )
    database = Database(
        options["postgres"],
        reactor,
        statement_timeout=float(options["statement-timeout"]),
        lock_timeout=float(options["lock-timeout"]),
    )
    consumer = Consumer(
        streams,
        database,
        DeviceState(int(options["state-size"])),
        metrics,
        reactor,
        ConsumerConfig(
            batch_size=int(options["batch-size"]),
            block_ms=block_ms,
            claim_idle=float(options["claim-idle"]),
            claim_interval=float(options["claim-interval"]),
            max_deliveries=int(options["max-deliveries"]),
            refresh_interval=float(options["refresh-interval"]),
            retry_max=float(options["retry-max"]),
            group_start=options["group-start"],
        ),
        migrate=apply_migrations,
    )
    children: list[IService] = []
    if options["metrics"]:
        ops = ops_service(
            options["metrics"],
            registry,
            {
                "redis": lambda: consumer.redis_ok,
                "postgres": lambda: consumer.postgres_ok,
                "consumer": consumer.ready,
                **({"redis-master": master_known} if isinstance(address, SentinelAddress) else {}),
            },
            reactor=reactor,
        )
        children.append(ops)
    processor = ProcessorService(
        consumer,
        (),
        reactor,
        connect=connect,
        housekeeping=Housekeeping(
            stats_interval=float(options["stats-interval"]),
            trim=bool(options["trim"]),
            trim_interval=float(options["trim-interval"]),
            retire_idle=float(options["retire-idle-consumers"]),
        ),
        exits=ExitPolicy(
            shutdown_timeout=float(options["shutdown-timeout"]),
            crash_exit=exit_after_shutdown(reactor),
        ),
        description=(
            f"stream {options['stream']} group {options['group']} consumer "
            f"{options['consumer']}, Redis {address}, PostgreSQL {redact_dsn(options['postgres'])}"
        ),
    )
    children.append(processor)
    if options.get("live"):
        from teltonika.processor.live.service import live_service

        live = live_service(
            options,
            registry,
            reactor,
            connect_redis=lambda: reader_connection(address, reply_timeout=timeout),
            stream=options["stream"],
            instance=options["consumer"],
            state_size=int(options["state-size"]),
        )
        children.append(live)
    return ProcessorTree(processor, children)
