"""The ingestion server's Prometheus metrics, on a registry the caller owns.

``makeService`` creates one :class:`~prometheus_client.CollectorRegistry` per server and
tests create one per test, so nothing here touches prometheus_client's global default
registry and tests never see each other's counts.

No metric carries an IMEI (or any other unbounded value) as a label: a fleet of 100,000
trackers would make 100,000 time series. Labels are codec names, results and the stable
``reason`` strings of :class:`teltonika.wire.errors.DecodeError` and of protocol violations.
"""

from __future__ import annotations

from typing import Final

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


class ServerMetrics:
    """Every counter, gauge and histogram of the ingestion server.

    :param registry: where the metrics are registered (a fresh one per server or test).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connections_open = Gauge(
            "teltonika_connections_open", "Device TCP connections currently open.", registry=r
        )
        self.connections = Counter(
            "teltonika_connections", "Device TCP connections accepted.", registry=r
        )
        self.connections_refused = Counter(
            "teltonika_connections_refused",
            "Device TCP connections closed at once, by reason (max_connections, shutdown).",
            ["reason"],
            registry=r,
        )
        self.logins = Counter(
            "teltonika_logins",
            "IMEI logins by result (accepted, rejected, invalid, error, replaced).",
            ["result"],
            registry=r,
        )
        self.authority_failures = Counter(
            "teltonika_authority_failures",
            "Device lookups that gave no answer (the login or datagram was refused), by "
            "reason (timeout, busy, unavailable, error).",
            ["reason"],
            registry=r,
        )
        self.timeouts = Counter(
            "teltonika_timeouts",
            "Connections closed by a timer, by kind (login, idle; close: aborted after the "
            "close grace because the peer did not read).",
            ["kind"],
            registry=r,
        )
        self.frames = Counter(
            "teltonika_frames", "Data frames decoded, by codec.", ["codec"], registry=r
        )
        self.records = Counter(
            "teltonika_records", "AVL records decoded, by codec.", ["codec"], registry=r
        )
        self.messages = Counter(
            "teltonika_device_messages",
            "Codec 12/13/14 device messages published to the messages stream, by codec.",
            ["codec"],
            registry=r,
        )
        self.keepalives = Counter(
            "teltonika_keepalives", "Keepalive (0xFF) bytes received.", registry=r
        )
        self.decode_errors = Counter(
            "teltonika_decode_errors",
            "Frames or datagrams rejected, by reason (DecodeError.reason or a protocol rule).",
            ["reason"],
            registry=r,
        )
        self.acks = Counter(
            "teltonika_acks",
            "ACKs sent after the sink confirmed, by transport.",
            ["transport"],
            registry=r,
        )
        self.acked_records = Counter(
            "teltonika_acked_records", "Records acknowledged to devices.", registry=r
        )
        self.sink_latency = Histogram(
            "teltonika_sink_latency_seconds",
            "Time from handing a frame to the sink until the sink confirmed it.",
            ["sink"],
            buckets=SINK_LATENCY_BUCKETS,
            registry=r,
        )
        self.sink_failures = Counter(
            "teltonika_sink_failures",
            "Frames the sink could not store (never ACKed), by sink.",
            ["sink"],
            registry=r,
        )
        self.sink_batches = Counter(
            "teltonika_sink_batches",
            "Sink round trips (pipelines or group commits), by sink.",
            ["sink"],
            registry=r,
        )
        self.sink_ready = Gauge(
            "teltonika_sink_ready", "1 while the sink can store records, else 0.", registry=r
        )
        self.sink_durability_lost = Counter(
            "teltonika_sink_durability_lost",
            "Times Redis stopped giving the durability --redis-durability fsync or "
            "replicated asked for (the sink refused frames until a check passed again).",
            registry=r,
        )
        self.sink_replicas_unconfirmed = Counter(
            "teltonika_sink_replicas_unconfirmed",
            "Batches that fewer replicas than --redis-replicas confirmed in time (with "
            "--redis-durability replicated; nothing in them was ACKed).",
            registry=r,
        )
        self.backlog_pauses = Counter(
            "teltonika_backlog_pauses",
            "Times a connection stopped reading because too many frames were pending.",
            registry=r,
        )
        self.bytes_in = Counter(
            "teltonika_bytes_received",
            "Bytes received from devices.",
            ["transport"],
            registry=r,
        )
        self.bytes_out = Counter(
            "teltonika_bytes_sent", "Bytes sent to devices.", ["transport"], registry=r
        )
        self.command_queue_depth = Gauge(
            "teltonika_command_queue_depth_total",
            "Commands queued or outstanding, summed over all device sockets.",
            registry=r,
        )
        self.unsolicited_replies = Counter(
            "teltonika_command_unsolicited_replies_total",
            "Codec 12/14 replies that matched no outstanding command.",
            ["codec"],
            registry=r,
        )
        self.datagrams = Counter(
            "teltonika_udp_datagrams",
            "UDP datagrams by result (acked, malformed, rejected, authority_failed, "
            "sink_failed, ack_failed).",
            ["result"],
            registry=r,
        )
