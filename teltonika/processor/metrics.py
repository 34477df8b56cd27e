"""The processor's Prometheus metrics, on a registry of its own (one per ``makeService``).

No IMEI labels anywhere: the only labels are ``reason`` (dead letters, a fixed list) and
``kind`` (error classes).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from teltonika.processor.entries import REASONS

_PREFIX = "teltonika_processor_"


class ProcessorMetrics:
    """All processor metrics, registered on *registry*."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.entries_read = Counter(
            _PREFIX + "entries_read",
            "Stream entries read (new, own pending and claimed)",
            registry=registry,
        )
        self.entries_claimed = Counter(
            _PREFIX + "entries_claimed",
            "Entries taken over from idle consumers by XAUTOCLAIM",
            registry=registry,
        )
        self.entries_deleted = Counter(
            _PREFIX + "entries_deleted",
            "Pending entries whose content was trimmed away before processing (acknowledged)",
            registry=registry,
        )
        self.entries_taken_over = Counter(
            _PREFIX + "entries_taken_over",
            "Held entries another consumer claimed meanwhile (not taken back; both write them)",
            registry=registry,
        )
        self.entries_refreshed = Counter(
            _PREFIX + "entries_refreshed",
            "Held entries whose idle time was reset (every --refresh-interval) so that no "
            "peer claims them",
            registry=registry,
        )
        self.consumers_retired = Counter(
            _PREFIX + "consumers_retired",
            "Idle consumers with nothing pending deleted from the group (--retire-idle-consumers)",
            registry=registry,
        )
        self.rows_inserted = Counter(
            _PREFIX + "rows_inserted", "Rows inserted into positions", registry=registry
        )
        self.duplicates = Counter(
            _PREFIX + "duplicates",
            "Records already stored (ON CONFLICT DO NOTHING)",
            registry=registry,
        )
        self.acked = Counter(_PREFIX + "entries_acked", "Entries acknowledged", registry=registry)
        self.dead_lettered = Counter(
            _PREFIX + "dead_lettered",
            "Entries sent to the dead-letter stream",
            ["reason"],
            registry=registry,
        )
        for reason in REASONS:
            self.dead_lettered.labels(reason=reason)
        self.batch_size = Histogram(
            _PREFIX + "batch_size",
            "Entries per batch",
            buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000),
            registry=registry,
        )
        self.batch_seconds = Histogram(
            _PREFIX + "batch_seconds",
            "Seconds from read to acknowledgement of a batch",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.postgres_errors = Counter(
            _PREFIX + "postgres_errors", "Failed database calls", ["kind"], registry=registry
        )
        self.redis_errors = Counter(
            _PREFIX + "redis_errors", "Failed Redis commands", registry=registry
        )
        self.rehydration_queries = Counter(
            _PREFIX + "rehydration_queries",
            "Queries that rehydrated devices missing from memory (at most one per batch)",
            registry=registry,
        )
        self.devices_rehydrated = Counter(
            _PREFIX + "devices_rehydrated",
            "Devices whose latest position was loaded from positions",
            registry=registry,
        )
        self.devices = Gauge(_PREFIX + "devices", "Devices held in state", registry=registry)
        self.lag = Gauge(
            _PREFIX + "consumer_lag",
            "Entries not yet delivered to our group (XINFO GROUPS lag)",
            registry=registry,
        )
        self.pending = Gauge(
            _PREFIX + "pending",
            "Entries delivered to our group and not yet acknowledged",
            registry=registry,
        )
        self.trimmed = Counter(
            _PREFIX + "entries_trimmed", "Entries removed by --trim", registry=registry
        )
