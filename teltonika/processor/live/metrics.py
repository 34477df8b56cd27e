"""Metrics of the live broadcast, on the processor's registry (``/metrics``).

All prefixed ``teltonika_processor_live_``. Labels are low-cardinality on purpose: no
IMEI, no user, no event id. Declared like every metrics class of this package (see
:mod:`teltonika.metrics`).
"""

from __future__ import annotations

from typing import Final

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_PREFIX: Final = "teltonika_processor_live_"

AUTH_RESULTS: Final = (
    "ok",
    "unauthenticated",
    "upstream_unavailable",
    "origin_refused",
    "subprotocol_refused",
    "too_many_connections",
    "too_many_for_user",
)
CLOSE_REASONS: Final = (
    "binary",
    "not_json",
    "rate_limited",
    "slow_client",
    "unauthenticated",
    "shutdown",
    "oversize",
    "protocol_error",
    "invalid_utf8",
)


@attrs.frozen
class LiveMetrics:
    """Every live metric.

    :ivar registry: where they are registered: the processor's (served on ``/metrics``).
    """

    registry: CollectorRegistry
    connections: Gauge
    authenticating: Gauge
    subscriptions: Gauge
    subscribed_devices: Gauge
    messages: Counter
    bytes: Counter
    conflated: Counter
    evictions: Counter
    auth: Counter
    errors: Counter
    closes: Counter
    directus_seconds: Histogram
    directus_cache: Counter
    snapshot_seconds: Histogram
    fanout_lag: Gauge
    fanout_entries: Counter
    fanout_skipped: Counter
    fanout_errors: Counter
    postgres_loads: Counter
    latest_devices: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> LiveMetrics:
        """The metrics, registered on *registry* (each test passes a fresh one)."""
        metrics = cls(
            registry=registry,
            connections=Gauge(
                _PREFIX + "connections", "Open WebSocket connections", registry=registry
            ),
            authenticating=Gauge(
                _PREFIX + "authenticating",
                "Handshakes waiting for their authentication answer",
                registry=registry,
            ),
            subscriptions=Gauge(
                _PREFIX + "subscriptions", "Active subscriptions", registry=registry
            ),
            subscribed_devices=Gauge(
                _PREFIX + "subscribed_devices",
                "Devices watched, summed over subscriptions",
                registry=registry,
            ),
            messages=Counter(
                _PREFIX + "messages_sent", "Messages sent, by type", ["type"], registry=registry
            ),
            bytes=Counter(_PREFIX + "bytes_sent", "Message bytes sent", registry=registry),
            conflated=Counter(
                _PREFIX + "positions_conflated",
                "Positions replaced by a newer one while a client was not reading",
                registry=registry,
            ),
            evictions=Counter(
                _PREFIX + "slow_client_evictions",
                "Connections aborted after not reading for --live-slow-timeout",
                registry=registry,
            ),
            auth=Counter(
                _PREFIX + "auth_results",
                "Handshake outcomes by result",
                ["result"],
                registry=registry,
            ),
            errors=Counter(
                _PREFIX + "request_errors",
                "Requests answered with an error, by code",
                ["code"],
                registry=registry,
            ),
            closes=Counter(
                _PREFIX + "closes",
                "Connections the server closed, by reason",
                ["reason"],
                registry=registry,
            ),
            directus_seconds=Histogram(
                _PREFIX + "directus_seconds",
                "Latency of Directus calls, by call",
                ["call"],
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5),
                registry=registry,
            ),
            directus_cache=Counter(
                _PREFIX + "directus_cache",
                "Directus lookups answered from the cache or a call in flight (hit) or by a "
                "new call (miss)",
                ["result"],
                registry=registry,
            ),
            snapshot_seconds=Histogram(
                _PREFIX + "snapshot_seconds",
                "Seconds from subscribe to snapshot sent (authorization and loading included)",
                buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                registry=registry,
            ),
            fanout_lag=Gauge(
                _PREFIX + "fanout_lag_seconds",
                "Server clock minus the time in the id of the newest stream entry read",
                registry=registry,
            ),
            fanout_entries=Counter(
                _PREFIX + "fanout_entries",
                "Stream entries read by the fan-out reader",
                registry=registry,
            ),
            fanout_skipped=Counter(
                _PREFIX + "fanout_unusable",
                "Stream entries the live broadcast could not show (not a valid record)",
                registry=registry,
            ),
            fanout_errors=Counter(
                _PREFIX + "fanout_errors", "Failed fan-out reads", registry=registry
            ),
            postgres_loads=Counter(
                _PREFIX + "postgres_loads",
                "Queries that loaded devices missing from the latest map",
                registry=registry,
            ),
            latest_devices=Gauge(
                _PREFIX + "latest_devices", "Devices held in the latest map", registry=registry
            ),
        )
        for result in AUTH_RESULTS:
            metrics.auth.labels(result=result)
        for reason in CLOSE_REASONS:
            metrics.closes.labels(reason=reason)
        return metrics
