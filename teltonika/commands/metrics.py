"""Prometheus metrics of the command path; no IMEI label anywhere (cardinality rule).

The objects are built against a registry handed in, so each test can use a fresh
``CollectorRegistry()``; the server builds one set against its own registry at start, as
part of :class:`~teltonika.metrics.ServerMetrics` (declared the same way).
"""

from __future__ import annotations

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge


@attrs.frozen
class CommandMetrics:
    """The command path's metrics.

    :ivar registry: where they are registered.
    :ivar queue_depth: ``teltonika_command_queue_depth_total``: commands queued or
        outstanding, summed over every socket of this process (a gauge: the ``_total``
        is its given name, kept for the dashboards that use it).
    :ivar commands: ``teltonika_commands_total{status,reason}``: statuses published.
    :ivar registry_failures: ``teltonika_registry_failures_total{operation}``: registry or
        heartbeat writes that failed (Redis down); the device stays connected.
    :ivar janitor_failures: ``teltonika_janitor_failures_total``: janitor passes that failed.
    :ivar janitor_removed: ``teltonika_janitor_removed_total``: registry entries of dead
        instances this instance's janitor removed.
    :ivar unsolicited: ``teltonika_command_unsolicited_replies_total{codec}``: codec 12/14
        replies that matched no outstanding command.
    :ivar update_retries: ``teltonika_command_redis_retries_total{update}``: failed
        attempts of a Redis update that is retried until Redis takes it (``settle``: a
        terminal status; ``take_offline``: moving offline commands at login).
    """

    registry: CollectorRegistry
    queue_depth: Gauge
    commands: Counter
    registry_failures: Counter
    janitor_failures: Counter
    janitor_removed: Counter
    unsolicited: Counter
    update_retries: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> CommandMetrics:
        """The metrics, registered on *registry* (each test passes a fresh one; the server
        creates them once, with :class:`~teltonika.metrics.ServerMetrics`)."""
        return cls(
            registry=registry,
            queue_depth=Gauge(
                "teltonika_command_queue_depth_total",
                "Commands queued or outstanding, summed over all device sockets.",
                registry=registry,
            ),
            commands=Counter(
                "teltonika_commands_total",
                "Command statuses published to commands:responses.",
                ["status", "reason"],
                registry=registry,
            ),
            registry_failures=Counter(
                "teltonika_registry_failures_total",
                "Connection registry or heartbeat operations that failed.",
                ["operation"],
                registry=registry,
            ),
            janitor_failures=Counter(
                "teltonika_janitor_failures_total",
                "Janitor passes that failed (logged, retried on the next tick).",
                registry=registry,
            ),
            janitor_removed=Counter(
                "teltonika_janitor_removed_total",
                "Registry entries of dead instances removed by this instance's janitor.",
                registry=registry,
            ),
            unsolicited=Counter(
                "teltonika_command_unsolicited_replies_total",
                "Codec 12/14 replies that matched no outstanding command.",
                ["codec"],
                registry=registry,
            ),
            update_retries=Counter(
                "teltonika_command_redis_retries_total",
                "Failed attempts of command-plane Redis updates that are retried.",
                ["update"],
                registry=registry,
            ),
        )
