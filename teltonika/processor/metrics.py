"""The processor's Prometheus metrics, on a registry of its own (one per ``makeService``).

Declared like every metrics class of this package (see :mod:`teltonika.metrics`).

No IMEI labels anywhere: the only labels are ``reason`` (dead letters, a fixed list) and
``kind`` (error classes).
"""

from __future__ import annotations

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from teltonika.processor.entries import REASONS

_PREFIX = "teltonika_processor_"


@attrs.frozen
class ProcessorMetrics:
    """Every counter, gauge and histogram of the processor (the live broadcast's are
    :class:`~teltonika.processor.live.metrics.LiveMetrics`, on the same registry).

    :ivar registry: where they are registered (served on ``/metrics``).
    """

    registry: CollectorRegistry
    entries_read: Counter
    entries_claimed: Counter
    entries_deleted: Counter
    entries_taken_over: Counter
    entries_refreshed: Counter
    consumers_retired: Counter
    rows_inserted: Counter
    duplicates: Counter
    acked: Counter
    dead_lettered: Counter
    batch_size: Histogram
    batch_seconds: Histogram
    postgres_errors: Counter
    redis_errors: Counter
    rehydration_queries: Counter
    devices_rehydrated: Counter
    devices: Gauge
    lag: Gauge
    pending: Gauge
    trimmed: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ProcessorMetrics:
        """The metrics, registered on *registry* (each test passes a fresh one)."""
        metrics = cls(
            registry=registry,
            entries_read=Counter(
                _PREFIX + "entries_read",
                "Stream entries read (new, own pending and claimed)",
                registry=registry,
            ),
            entries_claimed=Counter(
                _PREFIX + "entries_claimed",
                "Entries taken over from idle consumers by XAUTOCLAIM",
                registry=registry,
            ),
            entries_deleted=Counter(
                _PREFIX + "entries_deleted",
                "Pending entries whose content was trimmed away before processing (acknowledged)",
                registry=registry,
            ),
            entries_taken_over=Counter(
                _PREFIX + "entries_taken_over",
                "Held entries another consumer claimed meanwhile (not taken back; both write them)",
                registry=registry,
            ),
            entries_refreshed=Counter(
                _PREFIX + "entries_refreshed",
                "Held entries whose idle time was reset (every --refresh-interval) so that no "
                "peer claims them",
                registry=registry,
            ),
            consumers_retired=Counter(
                _PREFIX + "consumers_retired",
                "Idle consumers with nothing pending deleted from the group "
                "(--retire-idle-consumers)",
                registry=registry,
            ),
            rows_inserted=Counter(
                _PREFIX + "rows_inserted", "Rows inserted into positions", registry=registry
            ),
            duplicates=Counter(
                _PREFIX + "duplicates",
                "Records already stored (ON CONFLICT DO NOTHING)",
                registry=registry,
            ),
            acked=Counter(_PREFIX + "entries_acked", "Entries acknowledged", registry=registry),
            dead_lettered=Counter(
                _PREFIX + "dead_lettered",
                "Entries sent to the dead-letter stream",
                ["reason"],
                registry=registry,
            ),
            batch_size=Histogram(
                _PREFIX + "batch_size",
                "Entries per batch",
                buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000),
                registry=registry,
            ),
            batch_seconds=Histogram(
                _PREFIX + "batch_seconds",
                "Seconds from read to acknowledgement of a batch",
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                registry=registry,
            ),
            postgres_errors=Counter(
                _PREFIX + "postgres_errors", "Failed database calls", ["kind"], registry=registry
            ),
            redis_errors=Counter(
                _PREFIX + "redis_errors", "Failed Redis commands", registry=registry
            ),
            rehydration_queries=Counter(
                _PREFIX + "rehydration_queries",
                "Queries that rehydrated devices missing from memory (at most one per batch)",
                registry=registry,
            ),
            devices_rehydrated=Counter(
                _PREFIX + "devices_rehydrated",
                "Devices whose latest position was loaded from positions",
                registry=registry,
            ),
            devices=Gauge(_PREFIX + "devices", "Devices held in state", registry=registry),
            lag=Gauge(
                _PREFIX + "consumer_lag",
                "Entries not yet delivered to our group (XINFO GROUPS lag)",
                registry=registry,
            ),
            pending=Gauge(
                _PREFIX + "pending",
                "Entries delivered to our group and not yet acknowledged",
                registry=registry,
            ),
            trimmed=Counter(
                _PREFIX + "entries_trimmed", "Entries removed by --trim", registry=registry
            ),
        )
        for reason in REASONS:
            metrics.dead_lettered.labels(reason=reason)
        return metrics
