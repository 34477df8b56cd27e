"""The ingestion server's Prometheus metrics, on a registry the caller owns.

``makeService`` creates one :class:`~prometheus_client.CollectorRegistry` per server and
tests create one per test, so nothing here touches prometheus_client's global default
registry and tests never see each other's counts.

Every metrics class of the package (this one,
:class:`~teltonika.commands.metrics.CommandMetrics`,
:class:`~teltonika.processor.metrics.ProcessorMetrics`,
:class:`~teltonika.processor.live.metrics.LiveMetrics`) is written the same way: a frozen
attrs class whose fields are the metrics, declared with their types, and a ``create``
class method that registers each of them on the registry it is given. Importing a module
registers nothing; a registry holds one set (a second ``create`` on it fails as a
duplicate), so the wiring creates each set once and hands it down.

No metric carries an IMEI (or any other unbounded value) as a label: a fleet of 100,000
trackers would make 100,000 time series. Labels are codec names, results and the stable
``reason`` strings of :class:`teltonika.wire.errors.DecodeError` and of protocol violations.
"""

from __future__ import annotations

from typing import Final

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SINK_LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Seconds. A healthy Redis pipeline answers in well under a millisecond, a fsync takes a
few milliseconds, and a device gives up on an ACK after 30 s by default."""


@attrs.frozen
class ServerMetrics:
    """Every counter, gauge and histogram of the ingestion server.

    :ivar registry: where the metrics are registered (a fresh one per server or test),
        served on ``/metrics``.
    :ivar command_queue_depth: ``teltonika_command_queue_depth_total``: commands queued or
        outstanding, summed over every socket of this process (a gauge: the ``_total`` is
        its given name, kept for the dashboards that use it).
    :ivar unsolicited_replies: ``teltonika_command_unsolicited_replies_total{codec}``:
        codec 12/14 replies that matched no outstanding command.
    """

    registry: CollectorRegistry
    connections_open: Gauge
    connections: Counter
    connections_refused: Counter
    logins: Counter
    authority_failures: Counter
    timeouts: Counter
    frames: Counter
    records: Counter
    messages: Counter
    keepalives: Counter
    decode_errors: Counter
    acks: Counter
    acked_records: Counter
    sink_latency: Histogram
    sink_failures: Counter
    sink_batches: Counter
    sink_ready: Gauge
    sink_durability_lost: Counter
    sink_replicas_unconfirmed: Counter
    backlog_pauses: Counter
    bytes_in: Counter
    bytes_out: Counter
    command_queue_depth: Gauge
    unsolicited_replies: Counter
    datagrams: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ServerMetrics:
        """The metrics, registered on *registry* (each test passes a fresh one)."""
        return cls(
            registry=registry,
            connections_open=Gauge(
                "teltonika_connections_open",
                "Device TCP connections currently open.",
                registry=registry,
            ),
            connections=Counter(
                "teltonika_connections", "Device TCP connections accepted.", registry=registry
            ),
            connections_refused=Counter(
                "teltonika_connections_refused",
                "Device TCP connections closed at once, by reason (max_connections, shutdown).",
                ["reason"],
                registry=registry,
            ),
            logins=Counter(
                "teltonika_logins",
                "IMEI logins by result (accepted, rejected, invalid, error, replaced).",
                ["result"],
                registry=registry,
            ),
            authority_failures=Counter(
                "teltonika_authority_failures",
                "Device lookups that gave no answer (the login or datagram was refused), by "
                "reason (timeout, busy, unavailable, error).",
                ["reason"],
                registry=registry,
            ),
            timeouts=Counter(
                "teltonika_timeouts",
                "Connections closed by a timer, by kind (login, idle; close: aborted after the "
                "close grace because the peer did not read).",
                ["kind"],
                registry=registry,
            ),
            frames=Counter(
                "teltonika_frames", "Data frames decoded, by codec.", ["codec"], registry=registry
            ),
            records=Counter(
                "teltonika_records", "AVL records decoded, by codec.", ["codec"], registry=registry
            ),
            messages=Counter(
                "teltonika_device_messages",
                "Codec 12/13/14 device messages published to the messages stream, by codec.",
                ["codec"],
                registry=registry,
            ),
            keepalives=Counter(
                "teltonika_keepalives", "Keepalive (0xFF) bytes received.", registry=registry
            ),
            decode_errors=Counter(
                "teltonika_decode_errors",
                "Frames or datagrams rejected, by reason (DecodeError.reason or a protocol rule).",
                ["reason"],
                registry=registry,
            ),
            acks=Counter(
                "teltonika_acks",
                "ACKs sent after the sink confirmed, by transport.",
                ["transport"],
                registry=registry,
            ),
            acked_records=Counter(
                "teltonika_acked_records", "Records acknowledged to devices.", registry=registry
            ),
            sink_latency=Histogram(
                "teltonika_sink_latency_seconds",
                "Time from handing a frame to the sink until the sink confirmed it.",
                ["sink"],
                buckets=SINK_LATENCY_BUCKETS,
                registry=registry,
            ),
            sink_failures=Counter(
                "teltonika_sink_failures",
                "Frames the sink could not store (never ACKed), by sink.",
                ["sink"],
                registry=registry,
            ),
            sink_batches=Counter(
                "teltonika_sink_batches",
                "Sink round trips (pipelines or group commits), by sink.",
                ["sink"],
                registry=registry,
            ),
            sink_ready=Gauge(
                "teltonika_sink_ready",
                "1 while the sink can store records, else 0.",
                registry=registry,
            ),
            sink_durability_lost=Counter(
                "teltonika_sink_durability_lost",
                "Times Redis stopped giving the durability --redis-durability fsync or "
                "replicated asked for (the sink refused frames until a check passed again).",
                registry=registry,
            ),
            sink_replicas_unconfirmed=Counter(
                "teltonika_sink_replicas_unconfirmed",
                "Batches that fewer replicas than --redis-replicas confirmed in time (with "
                "--redis-durability replicated; nothing in them was ACKed).",
                registry=registry,
            ),
            backlog_pauses=Counter(
                "teltonika_backlog_pauses",
                "Times a connection stopped reading because too many frames were pending.",
                registry=registry,
            ),
            bytes_in=Counter(
                "teltonika_bytes_received",
                "Bytes received from devices.",
                ["transport"],
                registry=registry,
            ),
            bytes_out=Counter(
                "teltonika_bytes_sent", "Bytes sent to devices.", ["transport"], registry=registry
            ),
            command_queue_depth=Gauge(
                "teltonika_command_queue_depth_total",
                "Commands queued or outstanding, summed over all device sockets.",
                registry=registry,
            ),
            unsolicited_replies=Counter(
                "teltonika_command_unsolicited_replies_total",
                "Codec 12/14 replies that matched no outstanding command.",
                ["codec"],
                registry=registry,
            ),
            datagrams=Counter(
                "teltonika_udp_datagrams",
                "UDP datagrams by result (acked, malformed, rejected, authority_failed, "
                "sink_failed, ack_failed).",
                ["result"],
                registry=registry,
            ),
        )
